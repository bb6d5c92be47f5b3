"""Where a client keeps the factors that never leave it (fedsa-lora's B): `PersonalStore`s.

With `personal-dir` set, one safetensors file per partition-id, written atomically and read
only when that client is sampled (memory does not grow with the number of clients); without
it, the node's Flower context, which a SuperNode (or a simulation) keeps across rounds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from safetensors.torch import load_file, save_file

from fedlora.outputs import write_atomic
from fedlora.records import from_array_record

CONTEXT_KEY = "personal-b"  # context.state key of the private factors


class FileStore:
    """One safetensors file per client."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, torch.Tensor] | None:
        return load_file(str(self.path)) if self.path.exists() else None

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        write_atomic(self.path, lambda tmp: save_file(contiguous, str(tmp)))


class ContextStore:
    """The node's Flower context state (one run, in memory)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> dict[str, torch.Tensor] | None:
        record = self.context.state.array_records.get(CONTEXT_KEY)
        return from_array_record(record) if record is not None else None

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        self.context.state[CONTEXT_KEY] = ArrayRecord(tensors)


def personal_store(folder: str, context: Context, partition_id: int
                   ) -> FileStore | ContextStore:
    """This client's store: a file under `folder` (its personal-dir) when it is set, else its
    Flower context."""
    if folder:
        return FileStore(Path(folder) / f"client-{partition_id}.safetensors")
    return ContextStore(context)
