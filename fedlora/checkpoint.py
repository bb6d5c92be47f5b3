"""Checkpoint after every complete round, and resume from the last one.

Layout under output-dir (safetensors + JSON only; nothing is ever unpickled):

    state/round-<n>.safetensors   global/<key>, residual/<key>, optimizer/<key> tensors
    state/round-<n>.json          round, node ranks, bytes so far, DP releases, RNG states
    state/latest.json             {"round": n}: written last

Every file is written to a temporary name and renamed, and `latest.json` is renamed into place
only after both files of its round are complete, so a crash at any instant (SIGKILL, power
loss) leaves `latest.json` pointing at a whole checkpoint. The metrics line and `rounds/<n>/`
of a round are written before its checkpoint; on resume, anything newer than the checkpoint
(a metrics line, a `rounds/<m>/` folder of the interrupted round) is removed, so the resumed
run writes each round exactly once.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedlora.outputs import METRICS, write_atomic

STATE_DIR = "state"
LATEST = "latest.json"


class ResumeError(ValueError):
    """The output folder holds nothing that can be resumed; the message says why."""


@dataclass
class Checkpoint:
    """The server state after round `round`."""

    round: int
    tensors: dict[str, torch.Tensor]
    meta: dict


def _write_json(target: Path, obj: dict) -> None:
    write_atomic(target, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def rng_state() -> dict:
    """Python's and numpy's global RNG states as JSON (torch's goes with the tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss),
                      float(cached)]}


def set_rng_state(state: dict, torch_state: torch.Tensor | None) -> None:
    """Restore what `rng_state` (and torch.get_rng_state) saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


def write_checkpoint(out_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write round `checkpoint.round`'s state, then point latest.json at it."""
    folder = Path(out_dir) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    n = checkpoint.round
    tensors = {k: v.contiguous() for k, v in checkpoint.tensors.items()}
    tensors["rng/torch"] = torch.get_rng_state()
    write_atomic(folder / f"round-{n}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    meta = {**checkpoint.meta, "round": n, "rng": rng_state()}
    _write_json(folder / f"round-{n}.json", meta)
    _write_json(folder / LATEST, {"round": n})
    return folder / f"round-{n}.safetensors"


def read_latest(out_dir: str | Path) -> Checkpoint:
    """The last complete checkpoint, or a ResumeError saying what is missing."""
    folder = Path(out_dir) / STATE_DIR
    pointer = folder / LATEST
    if not pointer.is_file():
        raise ResumeError(f"{out_dir} holds no complete round to resume from (no "
                          f"{STATE_DIR}/{LATEST}); the run stopped before its first round "
                          f"ended: start it again without --resume")
    try:
        n = int(json.loads(pointer.read_text())["round"])
        meta = json.loads((folder / f"round-{n}.json").read_text())
        tensors = load_file(str(folder / f"round-{n}.safetensors"))
    except Exception as err:  # OSError, JSON errors, SafetensorError (a damaged file)
        raise ResumeError(f"{pointer} points at a checkpoint that cannot be read ({err}); "
                          f"the files of {folder} were changed after the run wrote them") from None
    return Checkpoint(round=n, tensors=tensors, meta=meta)


def discard_after(out_dir: str | Path, last_round: int) -> int:
    """Remove what rounds after `last_round` left (metrics lines, rounds/<m>/, final/,
    newer checkpoints); returns how many metrics lines were dropped."""
    out_dir = Path(out_dir)
    metrics = out_dir / METRICS
    dropped = 0
    if metrics.exists():
        kept = []
        for line in metrics.read_text().splitlines():
            if line.strip():
                try:
                    round_ = json.loads(line)["round"]
                except (ValueError, KeyError):
                    round_ = last_round + 1  # a torn last line of the interrupted round
                if round_ <= last_round:
                    kept.append(line)
                else:
                    dropped += 1
        write_atomic(metrics, lambda tmp: tmp.write_text("".join(f"{k}\n" for k in kept)))
    rounds = out_dir / "rounds"
    for folder in rounds.iterdir() if rounds.exists() else ():
        if not folder.name.isdigit() or int(folder.name) > last_round:
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out_dir / "final", ignore_errors=True)
    for path in (out_dir / STATE_DIR).glob("round-*"):
        number = path.name.removeprefix("round-").split(".")[0]
        if number.isdigit() and int(number) > last_round:
            path.unlink()
    return dropped
