"""Which devices one node trains on (`devices`, `shard`): parsed here without torch, so a
command line is checked at once; `fedlora.train.distributed` runs the processes.

A spec is one of:

- `auto`: every visible CUDA device when there are several (one process each), otherwise one
  process on `device`, as a node with one device always did;
- a count `N`: one process on `device` for 1, `cuda:0` ... `cuda:N-1` for more;
- a list of CUDA devices, `0,1` or `cuda:0,cuda:1`;
- `cpu:N`: N processes on the CPU (gloo), for tests and for machines without a GPU.

With `shard` the node runs one process whose model is split across the listed CUDA devices
(`device_map="balanced"`) instead of one copy per device.
"""

from __future__ import annotations

SPEC_HELP = "auto, a count N, a list of CUDA devices (0,1 or cuda:0,cuda:1) or cpu:N"


class DeviceSpecError(ValueError):
    """A `devices` value that is not a device spec; the message says what is expected."""


def _bad(spec: str, why: str) -> DeviceSpecError:
    return DeviceSpecError(f"setting 'devices': expected {SPEC_HELP}, got {spec!r} ({why})")


def check_spec(spec: str) -> None:
    """Raise DeviceSpecError unless `spec` is a device spec (syntax only: no device is
    looked for)."""
    text = spec.strip()
    if text == "auto":
        return
    if text.startswith("cpu:"):
        count = text[4:]
        if not count.isdigit() or int(count) < 1:
            raise _bad(spec, "cpu:N needs a process count N >= 1")
        return
    if text.isdigit():
        if int(text) < 1:
            raise _bad(spec, "a count must be >= 1")
        return
    parts = [p.strip() for p in text.split(",")]
    indices = [p[5:] if p.startswith("cuda:") else p for p in parts]
    if not parts or any(not i.isdigit() for i in indices):
        raise _bad(spec, "each listed device must be a CUDA index: 0 or cuda:0")
    if len(set(map(int, indices))) != len(indices):
        raise _bad(spec, "a device is listed twice")
    if len(parts) == 1:
        raise _bad(spec, "a list names two or more devices; for one, set device=cuda:N")


def resolve(spec: str, device: str, cuda_count: int) -> list[str]:
    """The devices of the node's processes, one per process (`cpu` may repeat), for `spec`
    with `device` the single-process device and `cuda_count` CUDA devices visible."""
    check_spec(spec)
    text = spec.strip()
    if text == "auto":
        several = cuda_count > 1 and device in ("auto", "cuda")
        return [f"cuda:{i}" for i in range(cuda_count)] if several else [device]
    if text.startswith("cpu:"):
        return ["cpu"] * int(text[4:])
    if text.isdigit():
        wanted = [f"cuda:{i}" for i in range(int(text))] if int(text) > 1 else [device]
    else:
        wanted = [p.strip() if p.strip().startswith("cuda:") else f"cuda:{p.strip()}"
                  for p in text.split(",")]
    cuda = [d for d in wanted if d.startswith("cuda:")]
    missing = [d for d in cuda if int(d[5:]) >= cuda_count]
    if missing:
        raise DeviceSpecError(
            f"setting 'devices': {spec!r} asks for {', '.join(missing)}, but {cuda_count} "
            f"CUDA device(s) are visible; list only visible devices (CUDA_VISIBLE_DEVICES "
            f"renumbers them from 0), or use devices=auto")
    return wanted
