"""Read JSONL files of instruction records or chat `messages` records."""

from __future__ import annotations

import json
from pathlib import Path

INSTRUCTION_FIELDS = ("instruction", "output")


def check_record(record: object, where: str) -> dict:
    """Return the record if it is an instruction or a chat record, else raise naming fields."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)
        if not ok or msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects "
                             f"ending with an assistant message")
        return record
    if all(isinstance(record.get(f), str) for f in INSTRUCTION_FIELDS):
        return record
    raise ValueError(f"{where}: expected fields instruction/output (input optional) or "
                     f"messages, found {sorted(record)}")


def load_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL file, each checked; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; pass a .jsonl file with one "
                                f"instruction/output or messages record per line")
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            records.append(check_record(obj, f"{path}:{number}"))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records
