"""Server checkpoints: safetensors + JSON, written atomically, read back whole, and what a
resume removes (fedlora.checkpoint)."""

import json
import random

import numpy as np
import pytest
import torch

from fedlora.checkpoint import (
    Checkpoint,
    ResumeError,
    discard_after,
    read_latest,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from fedlora.outputs import METRICS


def checkpoint(n: int) -> Checkpoint:
    tensors = {"global/q.lora_A.weight": torch.full((2, 3), float(n)),
               "optimizer/m/q": torch.arange(6.0).reshape(2, 3) * n}
    return Checkpoint(round=n, tensors=tensors, meta={"node-ranks": {"7": 4}, "bytes-total": n})


def test_checkpoint_round_trips_tensors_and_meta(tmp_path):
    write_checkpoint(tmp_path, checkpoint(1))
    write_checkpoint(tmp_path, checkpoint(2))
    back = read_latest(tmp_path)
    assert back.round == 2
    for key, value in checkpoint(2).tensors.items():
        assert torch.equal(back.tensors[key], value)
    assert back.meta["node-ranks"] == {"7": 4} and back.meta["bytes-total"] == 2
    assert "rng/torch" in back.tensors and "python" in back.meta["rng"]
    # safetensors and JSON only: nothing that needs unpickling is written
    assert {p.suffix for p in (tmp_path / "state").iterdir()} == {".safetensors", ".json"}


@pytest.mark.parametrize("crash_at", ["tensors", "meta", "pointer"])
def test_a_crash_while_writing_a_round_leaves_the_previous_round_latest(tmp_path, monkeypatch,
                                                                        crash_at):
    """The process dies part-way through each of the three writes of round 2 (after writing
    half of the file): round 1 stays the latest, whole, and round 2 can be written later."""
    import fedlora.checkpoint as ckpt

    write_checkpoint(tmp_path, checkpoint(1))
    real_write_atomic = ckpt.write_atomic
    targets = {"tensors": "round-2.safetensors", "meta": "round-2.json", "pointer": "latest.json"}

    def dying_write(target, write):
        if target.name == targets[crash_at]:
            tmp = target.with_name(f".{target.name}.crash.tmp")
            write(tmp)
            tmp.write_bytes(tmp.read_bytes()[: max(1, tmp.stat().st_size // 2)])
            raise OSError("killed mid-write")
        real_write_atomic(target, write)

    monkeypatch.setattr(ckpt, "write_atomic", dying_write)
    with pytest.raises(OSError, match="killed mid-write"):
        write_checkpoint(tmp_path, checkpoint(2))
    back = read_latest(tmp_path)
    assert back.round == 1
    assert torch.equal(back.tensors["global/q.lora_A.weight"], torch.full((2, 3), 1.0))
    monkeypatch.setattr(ckpt, "write_atomic", real_write_atomic)
    write_checkpoint(tmp_path, checkpoint(2))
    assert read_latest(tmp_path).round == 2


def test_nothing_to_resume_and_a_damaged_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ResumeError, match="no complete round to resume from"):
        read_latest(tmp_path)
    write_checkpoint(tmp_path, checkpoint(1))
    (tmp_path / "state" / "round-1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ResumeError, match="cannot be read"):
        read_latest(tmp_path)


def test_discard_after_removes_what_the_interrupted_round_left(tmp_path):
    for n in (1, 2, 3):
        write_checkpoint(tmp_path, checkpoint(n))
        (tmp_path / "rounds" / str(n)).mkdir(parents=True)
    (tmp_path / "final").mkdir()
    lines = [json.dumps({"round": n}) for n in (1, 2, 3)] + ['{"round": 4, "trai']  # torn
    (tmp_path / METRICS).write_text("\n".join(lines) + "\n")
    dropped = discard_after(tmp_path, 2)
    assert dropped == 2
    assert [json.loads(x)["round"] for x in (tmp_path / METRICS).read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["1", "2"]
    assert not (tmp_path / "final").exists()
    assert not (tmp_path / "state" / "round-3.safetensors").exists()
    assert (tmp_path / "state" / "round-2.json").exists()


def test_rng_state_restores_python_numpy_and_torch():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved, saved_torch = json.loads(json.dumps(rng_state())), torch.get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved, saved_torch)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
