"""Read records from JSONL, JSON, CSV/TSV, Parquet, save_to_disk folders or the HF hub.

Every source is read into (where, row) pairs, where `where` names the file and line or row
for error messages; each row is then renamed by the field map and turned into one of the
record forms that `fedlora.data.format` tokenizes:

    instruction/output (input optional)   Alpaca
    prompt/completion                     raw text pair (no template), or two message lists
    messages: [{role, content}, ...]      chat, ending with the assistant's answer; an
                                          assistant turn with "weight": 0 is context only
    conversations: [{from, value}, ...]   ShareGPT; human/gpt/system -> user/assistant/system
                                          (more names: the setting roles-map)
    text                                  plain text (continued pre-training), nothing else

Fields not used by the form (a category, a task name) are kept, so `partition-field` can
split by them; a null in one of those fields counts as absent (tables mixing forms).
BIG-bench task files (`bigbench:<file or folder>`) are read by `fedlora.data.bigbench`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedlora.config import BIGBENCH_PREFIX, HUB_PREFIX, RECORD_FIELDS
from fedlora.data.format import as_text, is_text

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
FORMS = ("instruction/output (input optional), prompt/completion, messages "
         "[{role, content}], conversations [{from, value}] or text (plain text)")
SOURCES = (".jsonl, .json, .csv, .tsv or .parquet file, a folder written by datasets' "
           "save_to_disk, hf:<owner/name>[:<config>], or bigbench:<BIG-bench task.json or "
           "folder of them>")

Rows = list[tuple[str, object]]  # (where, raw row) pairs


# ---- readers: a source -> (where, row) pairs ----

def read_jsonl(path: Path) -> Rows:
    """One JSON value per non-blank line."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                rows.append((f"{path}:{number}", parse_json(line, f"{path}:{number}")))
    return rows


def read_json(path: Path) -> Rows:
    """A list of objects, or an object with exactly one list field ({"data": [...]})."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a JSON Lines file named .json
            return read_jsonl(path)
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(value, dict):
        lists = [key for key, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            hint = (f" (a BIG-bench task? pass {BIGBENCH_PREFIX}{path})" if "examples" in lists
                    else "")
            raise ValueError(f"{path}: expected a list of records or an object with one list "
                             f"field such as {{\"data\": [...]}}, found an object whose list "
                             f"fields are {lists}; keep one list of records{hint}")
        return [(f"{path} {lists[0]}[{i}]", row) for i, row in enumerate(value[lists[0]])]
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a list of records, got a JSON "
                         f"{type(value).__name__}")
    return [(f"{path}[{i}]", row) for i, row in enumerate(value)]


def read_csv(path: Path, delimiter: str = ",") -> Rows:
    """A header line of field names, then one record per row (line numbers as in an editor)."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        return [(f"{path}:{reader.line_num}", row) for row in reader]


def read_tsv(path: Path) -> Rows:
    """CSV with tab separators."""
    return read_csv(path, delimiter="\t")


def read_parquet(path: Path) -> Rows:
    """Every row of a Parquet file (nested columns such as messages become lists of dicts)."""
    import pyarrow.parquet as pq

    return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]


def read_saved(folder: Path, split: str) -> Rows:
    """A Dataset or DatasetDict folder written by `save_to_disk` (DatasetDict: one split)."""
    if not any((folder / name).is_file() for name in ("dataset_dict.json", "state.json")):
        raise ValueError(f"{folder} is a folder but not one written by datasets' save_to_disk "
                         f"(no dataset_dict.json or state.json in it); pass a {SOURCES}")
    import datasets

    data = pick_split(datasets.load_from_disk(str(folder)), split, str(folder))
    return [(f"{folder} ({split}) row {i}", row) for i, row in enumerate(data.to_list())]


class HubUnreachable(ConnectionError, ValueError):
    """The hub could not be reached for a dataset (offline, HF_HUB_OFFLINE=1, no network).
    A ConnectionError, and a ValueError so that the CLIs report it as a user error: one
    line, exit 2, no traceback."""


def read_hub(spec: str, split: str) -> Rows:
    """A Hugging Face hub dataset `<owner/name>[:<config>]` (online, or already cached)."""
    import datasets
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError

    name, _, config = spec.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split)
    except datasets.exceptions.DatasetNotFoundError:
        raise ValueError(f"the Hugging Face hub has no dataset {name} (or it is gated or "
                         f"private); check the id, or pass a local file or folder") from None
    # offline mode raises a ConnectionError; a network that fails in other ways, the others
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError, httpx.TransportError):
        raise HubUnreachable(
            f"could not reach the Hugging Face hub for dataset {name}; download it where you "
            f"are online (datasets.load_dataset(...).save_to_disk(folder)) and pass the "
            f"save_to_disk folder or a file") from None
    return [(f"hf:{spec} ({split}) row {i}", row) for i, row in enumerate(data.to_list())]


def pick_split(data, split: str, where: str):
    """The `split` of a DatasetDict (a plain Dataset is returned as is)."""
    if not hasattr(data, "keys"):
        return data
    if split not in data:
        raise ValueError(f"{where} holds the splits {sorted(data)}, not {split!r}; set "
                         f"data-split to one of them")
    return data[split]


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_tsv,
           ".parquet": read_parquet}


def read_rows(source: str, split: str = "train") -> Rows:
    """The raw rows of a source, dispatched on hf: prefix, folder, or file extension."""
    if source.startswith(HUB_PREFIX):
        return read_hub(source[len(HUB_PREFIX):], split)
    path = Path(source).expanduser()
    if path.is_dir():
        return read_saved(path, split)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; pass a {SOURCES}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: cannot read {path.suffix or 'extension-less'} files; pass "
                         f"a {SOURCES}")
    return reader(path)


def parse_json(text: str, where: str) -> object:
    """One JSON value, or a ValueError naming where it came from."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None


# ---- records: a raw row -> one of the record forms ----

def chat_messages(messages: object, where: str, field: str = "messages",
                  keys: tuple[str, str] = ("role", "content"),
                  roles: dict[str, str] | None = None) -> list[dict]:
    """Checked [{role, content}] ending with the assistant's answer, an assistant turn's
    "weight" (0 or 1) kept (ShareGPT: keys from/value, roles renamed by `roles`)."""
    role_key, content_key = keys
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and {role_key, content_key} <= m.keys() for m in messages)
    if not ok or not isinstance(messages, list):
        raise ValueError(f"{where}: {field!r} must be a non-empty list of {{{role_key}, "
                         f"{content_key}}} objects, got {str(messages)[:80]}")
    out = [{"role": sharegpt_role(m[role_key], where, roles) if roles else m[role_key],
            "content": as_text(m[content_key], content_key, where),
            **turn_weight(m, role_key, roles, where)} for m in messages]
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: {field!r} must end with the assistant's answer, but the "
                         f"last turn is from {messages[-1][role_key]!r}")
    return out


def turn_weight(message: dict, role_key: str, roles: dict[str, str] | None, where: str
                ) -> dict:
    """{"weight": 0 or 1} of an assistant turn that has one (0: context, not a target), else
    {}; a weight elsewhere or of another value is refused."""
    if message.get("weight") is None:
        return {}
    role = message[role_key]
    role = roles.get(role, role) if roles else role
    if role != "assistant" or message["weight"] not in (0, 1) or isinstance(message["weight"],
                                                                            bool):
        raise ValueError(f"{where}: a turn's \"weight\" must be 0 (context) or 1 (trained), "
                         f"and only an assistant turn has one; got weight "
                         f"{message['weight']!r} on a {role!r} turn")
    return {"weight": int(message["weight"])}


def sharegpt_role(role: object, where: str, roles: dict[str, str] = SHAREGPT_ROLES) -> str:
    """human/gpt/system (and user/assistant, and the names of roles-map) as chat roles."""
    if role not in roles:
        raise ValueError(f"{where}: ShareGPT turn from {role!r}; expected one of "
                         f"{sorted(roles)}, or name yours with the setting roles-map, e.g. "
                         f"roles-map=\"bot=assistant,person=user\"")
    return roles[str(role)]


def text_record(rec: dict, where: str) -> dict:
    """A text record (continued pre-training), its text non-empty."""
    text = as_text(rec["text"], "text", where)
    if not text.strip():
        raise ValueError(f"{where}: field 'text' is empty; a text record needs text to learn "
                         f"from (drop the record, or fill it)")
    return {**rec, "text": text}


def to_record(row: object, field_map: dict[str, str], where: str,
              roles_map: dict[str, str] | None = None) -> dict:
    """A raw row renamed by `field_map` ({ours: yours}) and checked as one record form
    (ShareGPT roles: the built-in names, and `roles_map` {yours: ours} over them)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a record object, got {type(row).__name__}")
    rec = {**row, **{ours: row[yours] for ours, yours in field_map.items() if yours in row}}
    # a null field is an absent one (Parquet/datasets fill the columns of other record forms)
    rec = {k: v for k, v in rec.items() if not (k in RECORD_FIELDS and v is None)}
    if "chosen" in rec and "rejected" in rec:  # a preference pair (objective=dpo)
        from fedlora.data.preference import to_pair

        return to_pair(rec, where)
    if "messages" in rec:
        return {**rec, "messages": chat_messages(rec["messages"], where)}
    if "conversations" in rec:
        rest = {k: v for k, v in rec.items() if k != "conversations"}
        turns = chat_messages(rec["conversations"], where, "conversations", ("from", "value"),
                              {**SHAREGPT_ROLES, **(roles_map or {})})
        return {**rest, "messages": turns}
    if "instruction" in rec and "output" in rec:
        return {**rec, "instruction": as_text(rec["instruction"], "instruction", where),
                "input": as_text(rec.get("input") or "", "input", where),
                "output": as_text(rec["output"], "output", where)}
    if "prompt" in rec and "completion" in rec:
        return prompt_completion(rec, where)
    if is_text(rec):
        return text_record(rec, where)
    mapped = f" after field-map {field_map}" if field_map else ""
    found = sorted(map(str, rec))
    raise ValueError(f"{where}: expected fields {FORMS}, found {found}{mapped}; "
                     f"rename yours with the setting field-map, e.g. "
                     f"field-map=\"instruction=question,output=answer\", or "
                     f"field-map=\"text=body\" for plain text to learn whole")


def prompt_completion(rec: dict, where: str) -> dict:
    """Text prompt/completion stays a raw pair; two message lists become one conversation."""
    if isinstance(rec["prompt"], list) and isinstance(rec["completion"], list):
        rest = {k: v for k, v in rec.items() if k not in ("prompt", "completion")}
        return {**rest, "messages": chat_messages(rec["prompt"] + rec["completion"], where,
                                                  "prompt + completion")}
    return {**rec, "prompt": as_text(rec["prompt"], "prompt", where),
            "completion": as_text(rec["completion"], "completion", where)}


def to_records(rows: Rows, field_map: dict[str, str] | None, source: str,
               roles_map: dict[str, str] | None = None) -> list[dict]:
    """Every row as a checked record; a source without any is an error."""
    records = [to_record(row, field_map or {}, where, roles_map) for where, row in rows]
    if not records:
        raise ValueError(f"{source} holds no records; expected records with fields {FORMS}")
    return records


def load_source(source: str, field_map: dict[str, str] | None = None,
                split: str = "train", roles_map: dict[str, str] | None = None) -> list[dict]:
    """All records of a file, save_to_disk folder or hf: hub id, renamed and checked (or of a
    bigbench: task file or folder, where `field_map`, `split` and `roles_map` do not
    apply)."""
    if source.startswith(BIGBENCH_PREFIX):
        from fedlora.data.bigbench import load_bigbench  # it reads files with this module

        return load_bigbench(source[len(BIGBENCH_PREFIX):])
    return to_records(read_rows(source, split), field_map, source, roles_map)


def load_jsonl(path: str | Path, field_map: dict[str, str] | None = None) -> list[dict]:
    """All records of a JSON Lines file, whatever its extension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; pass a {SOURCES}")
    return to_records(read_jsonl(path), field_map, str(path))
