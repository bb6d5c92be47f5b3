"""What a run leaves on disk: metrics.jsonl, rounds/<n>/ and final/ PEFT adapters, run.json."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig

from fedlora.adapters.lora import save_adapter
from fedlora.wire import M

METRICS = "metrics.jsonl"


def write_atomic(target: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename it to `target`: readers see the old file
    or the whole new one, never a part (the temporary name is per process)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)


class RunWriter:
    """Writes each round's adapter atomically and appends one JSON line per round."""

    def __init__(self, out_dir: str | Path, lora: PeftConfig, run_info: dict,
                 saved: Callable[[dict], dict] | None = None) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.lora = lora
        # what PEFT's adapter file holds, from the state written (P-tuning: its prompt)
        self.saved = saved or (lambda state: state)
        self.run_info = run_info
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")

    def _write_adapter(self, state: dict[str, torch.Tensor], target: Path, rank: int) -> Path:
        """Save into a temporary folder, then rename: never a half-written adapter."""
        tmp = target.parent / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        config = copy.deepcopy(self.lora)
        if isinstance(config, LoraConfig):  # the rank of this adapter (other methods: none)
            config.r = rank
        save_adapter(self.saved(state), config, tmp, extra=self.run_info)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        return target

    def write_round(self, server_round: int, state: dict[str, torch.Tensor], metrics: dict,
                    rank: int) -> None:
        """rounds/<n>/ adapter (of `rank`) plus one line in metrics.jsonl."""
        (self.out_dir / "rounds").mkdir(exist_ok=True)
        self._write_adapter(state, self.out_dir / "rounds" / str(server_round), rank)
        self.write_metrics(metrics)

    def write_metrics(self, metrics: dict) -> None:
        """One line in metrics.jsonl (round 0, the model before training, has no adapter)."""
        with open(self.out_dir / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")

    def write_final(self, state: dict[str, torch.Tensor], rank: int) -> Path:
        """final/ adapter (of `rank`)."""
        return self._write_adapter(state, self.out_dir / "final", rank)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All rounds of a run's metrics.jsonl (round 0, when evaluated, first)."""
    path = Path(out_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_rounds(rows: list[dict]) -> list[dict]:
    """The rows of rounds that trained (1, 2, ...): without round 0, the evaluation before
    training."""
    return [r for r in rows if r.get(M.ROUND, 0) >= 1]
