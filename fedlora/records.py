"""torch <-> Flower records: the only module of the core library that imports Flower."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_array_record(state: dict[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """LoRA factors -> ArrayRecord, cast to the wire dtype (bf16 cannot travel)."""
    dtype = WIRE_DTYPES[wire_dtype]
    return ArrayRecord({k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors keyed and typed as sent (deserialised with np.load, no pickle)."""
    return {k: torch.from_numpy(arr.numpy().copy()) for k, arr in record.items()}


def factor_bytes(record: ArrayRecord) -> int:
    """Bytes of one ArrayRecord as Flower serialises it."""
    return int(record.count_bytes())
