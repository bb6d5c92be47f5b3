"""Where a client keeps the factors that never leave it (fedsa-lora's B): `PersonalStore`s.

With `personal-dir` set, one safetensors file per partition-id, written atomically and read
only when that client is sampled (memory does not grow with the number of clients); without
it, the node's Flower context, which a SuperNode (or a simulation) keeps across rounds.

Each saved version carries the round that trained it, and the version before it is kept: a
store opened for round N reads the newest version from a round before N. So when a resumed
server replays a round that some nodes had already trained before it was killed, those nodes
start again from what they held when that round first began, and the resumed run computes
bit for bit what the uninterrupted one would have.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedlora.outputs import write_atomic
from fedlora.records import from_array_record

CONTEXT_KEY = "personal-b"  # context.state key of the private factors
PREVIOUS = "-previous"  # suffix of the version before
ROUNDS_KEY = "personal-b-rounds"  # context.state ConfigRecord: the round of each version
UNKNOWN_ROUND = 0  # a version saved without its round (older fedlora): older than any round


class FileStore:
    """One safetensors file per client, and the version before it."""

    def __init__(self, path: Path, server_round: int, evaluating: bool = False) -> None:
        self.path, self.round = path, server_round
        self.before = server_round + 1 if evaluating else server_round  # readable versions
        self.previous = path.with_name(path.stem + PREVIOUS + path.suffix)

    @staticmethod
    def saved_round(path: Path) -> int | None:
        """The round that wrote `path` (None: no such file)."""
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("round", UNKNOWN_ROUND))

    def load(self) -> dict[str, torch.Tensor] | None:
        """The newest version trained before this round (when evaluating: up to it)."""
        for path in (self.path, self.previous):
            saved = self.saved_round(path)
            if saved is not None and saved < self.before:
                return load_file(str(path))
        return None

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors` as this round's version; an older one becomes the version before
        (a replayed round overwrites its own version and keeps the one before)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        saved = self.saved_round(self.path)
        if saved is not None and saved < self.round:
            os.replace(self.path, self.previous)
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        meta = {"round": str(self.round)}
        write_atomic(self.path, lambda tmp: save_file(contiguous, str(tmp), metadata=meta))


class ContextStore:
    """The node's Flower context state (one run, in memory), and the version before."""

    def __init__(self, context: Context, server_round: int, evaluating: bool = False) -> None:
        self.context, self.round = context, server_round
        self.before = server_round + 1 if evaluating else server_round  # readable versions

    def rounds(self) -> dict[str, int]:
        """Round of each kept version, by context.state key."""
        record = self.context.state.config_records.get(ROUNDS_KEY)
        return {k: v for k, v in (record or {}).items() if isinstance(v, int)}

    def load(self) -> dict[str, torch.Tensor] | None:
        """The newest version trained before this round (when evaluating: up to it)."""
        rounds = self.rounds()
        for key in (CONTEXT_KEY, CONTEXT_KEY + PREVIOUS):
            record = self.context.state.array_records.get(key)
            if record is not None and rounds.get(key, UNKNOWN_ROUND) < self.before:
                return from_array_record(record)
        return None

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors` as this round's version; an older one becomes the version before."""
        state, rounds = self.context.state, self.rounds()
        current = state.array_records.get(CONTEXT_KEY)
        if current is not None and rounds.get(CONTEXT_KEY, UNKNOWN_ROUND) < self.round:
            state[CONTEXT_KEY + PREVIOUS] = current
            rounds[CONTEXT_KEY + PREVIOUS] = rounds.get(CONTEXT_KEY, UNKNOWN_ROUND)
        state[CONTEXT_KEY] = ArrayRecord(tensors)
        rounds[CONTEXT_KEY] = self.round
        state[ROUNDS_KEY] = ConfigRecord(dict(rounds))


def personal_store(folder: str, context: Context, partition_id: int, server_round: int,
                   evaluating: bool = False) -> FileStore | ContextStore:
    """This client's store for a message of `server_round` (training reads the version from
    before that round; evaluation the one trained in it): a file under `folder` (its
    personal-dir) when it is set, else its Flower context."""
    if folder:
        return FileStore(Path(folder) / f"client-{partition_id}.safetensors", server_round,
                         evaluating)
    return ContextStore(context, server_round, evaluating)
