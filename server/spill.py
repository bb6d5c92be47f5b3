"""Replies on disk while a round waits for its decisions: the server's memory does not grow
with the number of sites.

A round's screen needs every reply before it can decide (the lower median of the update
norms), and flexlora, flora and the robust rules need every reply to merge. So each accepted
reply's factors are written to a file as soon as the reply is read, and the reply keeps a
`SpilledFactors`: a read-only mapping module -> (B, A) that reads one module's two tensors
from the file when asked. The merges work module by module, so a merge over spilled replies
holds one module of every reply at a time, plus its result.

The file is a safetensors file (`<module>|B`, `<module>|A`, float32), written tensor by
tensor (never built in memory first). A round's files are written by one background thread
while the server reads the next reply (at most `RoundSpill.PENDING` replies wait in memory
for their write; a read waits for its file), so the disk's time overlaps the server's work;
a round whose merge never reads them back (its running sum held every kept reply) removes
them, maybe before they were written. Tensors are read with `os.pread` into a fresh buffer,
not through a memory map: a mapped file's pages count in the server's resident memory as long
as the file is mapped, which is what spilling is for avoiding. The folder of a round is
removed when the round is merged or given up (`RoundSpill.close`).

A write that fails with an OSError (a full disk, a folder gone) costs memory, not the round:
that reply and every later one of the round stay in memory, as they would without spilling,
and the server logs a warning once.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from logging import WARNING
from pathlib import Path

import torch
from flwr.common import log

from fedlora.aggregation import Factors

DTYPES = {torch.float32: "F32", torch.float64: "F64"}
TORCH = {v: k for k, v in DTYPES.items()}


class SpilledFactors(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """One reply's factors in a safetensors file, read module by module."""

    def __init__(self, path: Path, entries: dict[str, tuple[str, tuple[int, ...], int, int]],
                 written: Future | None = None) -> None:
        self.path = path
        self._entries = entries  # tensor key -> (dtype, shape, start, end) in the file
        self._modules = list(dict.fromkeys(k.rsplit("|", 1)[0] for k in entries))
        self._written = written  # the background write of the file (None: written)
        self.memory: Factors | None = None  # the factors themselves, when the write failed

    def __getitem__(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        if f"{module}|B" not in self._entries:
            raise KeyError(module)
        if self._written is not None:
            self._written.result()  # the file is complete (or its write's error is raised)
        if self.memory is not None:
            return self.memory[module]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return self._read(fd, f"{module}|B"), self._read(fd, f"{module}|A")
        finally:
            os.close(fd)

    def _read(self, fd: int, key: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[key]
        tensor = torch.empty(shape, dtype=TORCH[dtype])  # torch's allocator (huge pages)
        view, done = memoryview(tensor.numpy()).cast("B"), 0  # type: ignore[arg-type]
        if len(view) != end - start:
            raise OSError(f"{self.path}: {key} takes {end - start} bytes in the file, "
                          f"{len(view)} as a {dtype} tensor of shape {list(shape)}")
        while done < len(view):  # pread may return less than asked
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise OSError(f"{self.path}: the spilled reply ends early (at {start + done})")
            done += got
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """module -> (B's shape, A's shape), without reading the tensors."""
        return {m: (self._entries[f"{m}|B"][1], self._entries[f"{m}|A"][1])
                for m in self._modules}


def write_factors(factors: Factors, path: Path) -> SpilledFactors:
    """Write `factors` (float32 or float64 kept as they are) to a safetensors file at `path`,
    tensor by tensor; the mapping that reads them back."""
    spilled, write = layout(factors, path)
    write()
    return spilled


def layout(factors: Factors, path: Path, written: Future | None = None
           ) -> tuple[SpilledFactors, Callable[[], None]]:
    """The mapping that will read `factors` back from a safetensors file at `path` (waiting
    for `written` before a read), and the function that writes the file."""
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    tensors: list[torch.Tensor] = []
    offset = 0
    for module, (b, a) in factors.items():
        for part, tensor in (("B", b), ("A", a)):
            if tensor.dtype not in DTYPES:
                tensor = tensor.to(torch.float32)
            size = tensor.numel() * tensor.element_size()
            entries[f"{module}|{part}"] = (DTYPES[tensor.dtype], tuple(tensor.shape), offset,
                                           offset + size)
            tensors.append(tensor)
            offset += size
    header = json.dumps({k: {"dtype": d, "shape": list(s), "data_offsets": [b, e]}
                         for k, (d, s, b, e) in entries.items()}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned

    def write() -> None:
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            for tensor in tensors:
                array = tensor.detach().contiguous().numpy()
                fh.write(memoryview(array).cast("B"))  # type: ignore[arg-type]

    start = 8 + len(header)
    return SpilledFactors(path, {k: (d, s, b + start, e + start)
                                 for k, (d, s, b, e) in entries.items()}, written), write


class RoundSpill:
    """The folder of one round attempt's spilled replies (under `parent`, or the system's
    temporary folder when None), written in the background; `close()` removes it with
    everything in it."""

    PENDING = 2  # replies at most waiting in memory for their write

    def __init__(self, parent: Path | None, server_round: int) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"round-{server_round}-",
                                         dir=None if parent is None else str(parent)))
        self._count = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="spill")
        self._pending: deque[Future] = deque()
        self._written: list[Future] = []  # each file's completion, as its reader waits on it
        self.failed: OSError | None = None  # the first write that failed: no more are tried

    def keep(self, factors: Factors) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]:
        """`factors` to be written to this round's folder (in the background, after the
        replies before it); the mapping that reads them back. Waits while `PENDING` writes
        are queued. Once a write has failed with an OSError, `factors` themselves (the round
        goes on in memory); any other error of a write is raised."""
        while len(self._pending) >= self.PENDING:
            self._pending.popleft().result()
        if self.failed is not None:
            return factors
        self._count += 1
        written: Future = Future()
        path = self.dir / f"reply-{self._count}.safetensors"
        spilled, write = layout(factors, path, written)

        def run() -> None:
            if self.failed is None:  # else queued before an earlier write failed: no try
                try:
                    write()
                    written.set_result(None)
                    return
                except OSError as err:  # a full disk: this reply and the round's next in memory
                    path.unlink(missing_ok=True)
                    self.failed = err  # the one writer thread runs the writes in order
                    log(WARNING, "spill: writing a reply to %s failed (%s); this round keeps "
                        "its replies in memory from here on (the server's memory now grows "
                        "with them; free space there, or set spill-above-mb=-1 to hold them "
                        "in memory from the start)", self.dir, err)
                except BaseException as err:
                    written.set_exception(err)
                    raise
            spilled.memory = factors
            written.set_result(None)

        self._written.append(written)
        self._pending.append(self._writer.submit(run))
        return spilled

    def close(self) -> None:
        """Drop the writes not started, wait for the one running, remove the folder."""
        for pending in self._pending:
            pending.cancel()
        self._writer.shutdown(wait=True, cancel_futures=True)
        for written in self._written:  # a reader of a dropped write fails, never waits
            if not written.done():
                written.set_exception(FileNotFoundError(f"{self.dir}: the round's spill "
                                                        "was removed"))
        self._pending.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

