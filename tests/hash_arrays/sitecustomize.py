"""Test-only: a hash of every ArrayRecord a node's ClientApp worker or the ServerApp builds
(to send) or reads (received), so a test can check that a reply arrived bitwise equal.

tests/test_fleet16.py puts this folder on PYTHONPATH of `fedlora server` and of a
`fedlora client`, so every Python process below them imports this module at start-up. Only in
the resident ClientApp worker (`clients.worker`) and the ServerApp process (`flwr-serverapp`)
does it act: it imports fedlora.records before anything imports its functions by name and
wraps `to_array_record` and `from_array_record` so that each call appends one JSON line to
$FEDLORA_TEST_ARRAYS: the side (node or server), the call (to: built to send, from: read after
receipt), the time, the bytes as Flower serialises them and the SHA-256 of the record's keys,
dtypes, shapes and data bytes (what travels).
"""

import os


def _record_hash(record) -> str:  # type: ignore[no-untyped-def]
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(record.keys()):
        array = record[key].numpy()
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _log_records(side: str, path: str) -> None:
    """Wrap fedlora.records' ArrayRecord conversions to log each record's hash to `path`."""
    import json
    import time

    import fedlora.records as records

    def logged(call, record) -> None:  # type: ignore[no-untyped-def]
        line = {"side": side, "call": call, "time": time.time(), "pid": os.getpid(),
                "bytes": records.factor_bytes(record), "sha256": _record_hash(record)}
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    to_record, from_record = records.to_array_record, records.from_array_record

    def to_array_record(*args, **kwargs):  # type: ignore[no-untyped-def]
        record = to_record(*args, **kwargs)
        logged("to", record)
        return record

    def from_array_record(record):  # type: ignore[no-untyped-def]
        logged("from", record)
        return from_record(record)

    records.to_array_record, records.from_array_record = to_array_record, from_array_record


with open("/proc/self/cmdline", "rb") as _fh:
    _argv = _fh.read().decode(errors="replace").split("\0")
if os.environ.get("FEDLORA_TEST_ARRAYS"):
    if "clients.worker" in _argv:
        _log_records("node", os.environ["FEDLORA_TEST_ARRAYS"])
    elif any(os.path.basename(arg) == "flwr-serverapp" for arg in _argv):
        _log_records("server", os.environ["FEDLORA_TEST_ARRAYS"])
