"""torch <-> Flower records: the only module of the core library that imports Flower.

Factors travel packed: one ArrayRecord holds two arrays, `data` (every factor flattened and
concatenated, in the wire dtype) and `index` (UTF-8 JSON `[[key, shape], ...]` as uint8). Flower
sends each array of a message as its own object, one request each; SmolLM2 at rank 8 on all
projections has 420 factors, so packing turns 420 round trips per message into 2 (see
docs/benchmarks.md). Reading accepts packed records and plain ones (one array per key) alike;
either way nothing is unpickled (arrays are `.npy` buffers, the index is JSON).
"""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
PACKED = {"data", "index"}  # the keys of a packed record


def to_array_record(state: dict[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """LoRA factors -> one packed ArrayRecord in the wire dtype (bf16 cannot travel)."""
    if not state:
        return ArrayRecord()
    dtype = WIRE_DTYPES[wire_dtype]
    keys = sorted(state)
    index = json.dumps([[k, list(state[k].shape)] for k in keys]).encode()
    parts = [state[k].detach().to(dtype).reshape(-1).cpu().contiguous() for k in keys]
    return ArrayRecord({"index": Array(np.frombuffer(index, dtype=np.uint8).copy()),
                        "data": npy_concatenation([p.numpy() for p in parts])})


def npy_concatenation(parts: list[np.ndarray]) -> Array:
    """The Array of the 1-d concatenation of `parts` (contiguous, one dtype), its .npy bytes
    byte for byte what `Array(np.concatenate(parts))` holds, made with one copy of the data:
    np.save into a byte stream copies a large array three or four times (about 1.6 s of a
    1.9 s 7B-shaped reply or payload on this machine)."""
    dtype = parts[0].dtype
    count = sum(p.size for p in parts)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": (count,)})
    data = b"".join([header.getvalue(), *(p.data.cast("B") for p in parts)])
    return Array(dtype=str(dtype), shape=(count,), stype=SType.NUMPY, data=data)


def npy_array(array: Array, copy: bool = True) -> np.ndarray:
    """What `Array.numpy()` returns (np.load of its .npy bytes, never unpickling), made with
    one copy of the data: np.load from a byte stream copies each 256 KiB twice, which took
    about 0.14 s of the server's 0.5 s per 7B-shaped reply. An object dtype or a Fortran-order
    array is left to np.load (which refuses the first). `copy=False`: a read-only view of the
    Array's own bytes where they are a plain .npy buffer (no copy at all)."""
    if array.stype != SType.NUMPY:
        return array.numpy()  # Flower's own TypeError
    data = array.data
    stream = io.BytesIO(data[:65536 + 16])  # the header (numpy caps it at 64 KiB)
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        return array.numpy()
    shape, fortran_order, dtype = read_header(stream)
    if fortran_order or dtype.hasobject:
        return array.numpy()
    count = math.prod(shape)
    if stream.tell() + count * dtype.itemsize != len(data):
        raise ValueError(f"array data: the .npy header describes {count} values of {dtype}, "
                         f"the buffer holds {len(data) - stream.tell()} bytes after it")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape).copy() if copy else flat.reshape(shape)


def from_array_record(record: ArrayRecord, shared: bool = False) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors keyed and typed as sent; ValueError on a malformed packed one.

    `shared=True` (the server reading replies): a packed record's tensors are views of the
    message's own bytes, read-only, with no copy at all; copying a 7B-shaped reply into fresh
    memory took about 0.14 s a reply on this machine (most of it the kernel handing out new
    pages), 4.4 s of a 32-site round. The caller must never write into them (the server's
    merges make new tensors) and they keep the message's bytes alive while they live."""
    arrays = {k: npy_array(arr, copy=not (shared and k == "data")) for k, arr in record.items()}
    if set(arrays) != PACKED:
        return {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}
    index, data = arrays["index"], arrays["data"]
    if index.dtype != np.uint8 or index.ndim != 1 or data.ndim != 1:
        raise ValueError("packed record: expected a 1-d uint8 index and a 1-d data array")
    try:
        entries = json.loads(index.tobytes().decode("utf-8"))
        shapes = {str(k): tuple(int(d) for d in shape) for k, shape in entries}
    except (ValueError, TypeError) as err:
        raise ValueError(f"packed record: unreadable index ({err})") from None
    if len(shapes) != len(entries) or any(d < 0 for s in shapes.values() for d in s):
        raise ValueError("packed record: the index repeats a key or has a negative dimension")
    sizes = [math.prod(s) for s in shapes.values()]
    if sum(sizes) != data.size:
        raise ValueError(f"packed record: the index describes {sum(sizes)} values, the data "
                         f"holds {data.size}")
    # Array.numpy() made a fresh array from the message's bytes: no second copy of a large
    # reply (a read-only one, which torch cannot share, is copied)
    owner = data if data.flags.owndata else data.base
    fresh = data.flags.writeable and isinstance(owner, np.ndarray) and owner.flags.owndata
    if shared and not data.flags.writeable:
        with warnings.catch_warnings():  # torch's "not writable" warning: read-only by contract
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(data)
    else:
        flat = torch.from_numpy(data if fresh else data.copy())
    return {k: part.reshape(shape) for (k, shape), part
            in zip(shapes.items(), torch.split(flat, sizes))}


def factor_bytes(record: ArrayRecord) -> int:
    """Bytes of one ArrayRecord as Flower serialises it."""
    return int(record.count_bytes())
