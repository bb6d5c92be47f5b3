"""Replies on disk while a round waits for its decisions: the server's memory does not grow
with the number of sites.

A round's screen needs every reply before it can decide (the lower median of the update
norms), and flexlora, flora and the robust rules need every reply to merge. So each accepted
reply's factors are written to a file as soon as the reply is read, and the reply keeps a
`SpilledFactors`: a read-only mapping module -> (B, A) that reads one module's two tensors
from the file when asked. The merges work module by module, so a merge over spilled replies
holds one module of every reply at a time, plus its result.

The file is a safetensors file (`<module>|B`, `<module>|A`, float32), written tensor by
tensor (never built in memory first). Tensors are read with `os.pread` into a fresh buffer,
not through a memory map: a mapped file's pages count in the server's resident memory as long
as the file is mapped, which is what spilling is for avoiding. The folder of a round is
removed when the round is merged or given up (`RoundSpill.close`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fedlora.aggregation import Factors

DTYPES = {torch.float32: "F32", torch.float64: "F64"}
TORCH = {v: k for k, v in DTYPES.items()}


class SpilledFactors(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """One reply's factors in a safetensors file, read module by module."""

    def __init__(self, path: Path, entries: dict[str, tuple[str, tuple[int, ...], int, int]]
                 ) -> None:
        self.path = path
        self._entries = entries  # tensor key -> (dtype, shape, start, end) in the file
        self._modules = list(dict.fromkeys(k.rsplit("|", 1)[0] for k in entries))

    def __getitem__(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        if f"{module}|B" not in self._entries:
            raise KeyError(module)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return self._read(fd, f"{module}|B"), self._read(fd, f"{module}|A")
        finally:
            os.close(fd)

    def _read(self, fd: int, key: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[key]
        buffer = bytearray(end - start)
        view, done = memoryview(buffer), 0
        while done < len(buffer):  # pread may return less than asked
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise OSError(f"{self.path}: the spilled reply ends early (at {start + done})")
            done += got
        return torch.frombuffer(buffer, dtype=TORCH[dtype]).reshape(shape)

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
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for tensor in tensors:
            array = tensor.detach().contiguous().numpy()
            fh.write(memoryview(array).cast("B"))  # type: ignore[arg-type]
    start = 8 + len(header)
    return SpilledFactors(path, {k: (d, s, b + start, e + start)
                                 for k, (d, s, b, e) in entries.items()})


class RoundSpill:
    """The folder of one round attempt's spilled replies (under `parent`, or the system's
    temporary folder when None); `close()` removes it with everything in it."""

    def __init__(self, parent: Path | None, server_round: int) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"round-{server_round}-",
                                         dir=None if parent is None else str(parent)))
        self._count = 0

    def keep(self, factors: Factors) -> SpilledFactors:
        """`factors` written to this round's folder; the mapping that reads them back."""
        self._count += 1
        return write_factors(factors, self.dir / f"reply-{self._count}.safetensors")

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

