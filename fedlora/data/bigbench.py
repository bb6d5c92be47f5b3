"""BIG-bench JSON tasks as records: `dataset = "bigbench:<task.json file or folder>"`.

A BIG-bench JSON task (github.com/google/BIG-bench, `bigbench/benchmark_tasks/<task>/task.json`,
subtasks in `<task>/<subtask>/task.json`) is an object with `name`, `description` and
`examples`, each with `input` and either `target` (a string or a list of acceptable strings:
a generative task) or `target_scores` ({choice: score}: multiple choice, the highest score
marks the right choice or choices). The spec after the prefix is one such file, or a folder
searched recursively for `*.json` files that are tasks (objects with an `examples` field;
other JSON, such as a task's results files or the top-level task.json of a task made of
subtasks, is skipped); a folder's tasks are read in path order.

Each example becomes one record in the instruction/output form (no `input`), chosen because
training and `fedlora.train.accuracy.exact_match` then format it the same way: the user turn
of the chat template (or the plain template) is the BIG-bench prompt and the answer is the
assistant turn. (A prompt/completion pair would train on the raw text but be asked through the
chat template when scored.) The prompt is built as BIG-bench builds a zero-shot query:

    task_prefix + example_input_prefix + input [+ choice_prefix + choice_prefix.join(choices)]
        + example_output_prefix

with BIG-bench's defaults (`task_prefix` "", input prefix "\\nQ: ", output prefix "\\nA: ",
choice prefix "\\n  choice: ", choices appended unless `append_choices_to_input` is false),
then stripped of surrounding whitespace: the leading newline of the default input prefix and the
trailing space of an output prefix such as "\\nA: " belong to a raw text continuation, not to a
chat turn (so "\\nQ: 2+2?\\nA: " is asked as "Q: 2+2?\\nA:"). Choices are listed in file order
(BIG-bench shuffles them with a seed).

Record fields:
    instruction   the prompt above
    output        the first target (generative), or the first highest-scored choice
    task          the task's name (below); `partition-field=task partitioner=by-field` gives
                  one task per client
    targets       every acceptable answer: the targets (generative), or the highest-scored
                  choices followed by any `target` strings the example also has
    choices       multiple choice only: the choice texts, in file order
    target_scores multiple choice only: {choice: score} as in the file

Task names: a file named task.json is named by its folder, `<task>/<subtask>` when the folder
above also holds a task.json (BIG-bench's subtask layout); another file by its `source_task`
field when it has one (not a BIG-bench field: a task copied out of a BIG-bench tree may name its
original `<task>/<subtask>` folder there), else its `name`, else the file name. When two tasks of
a folder would share a name, each of them is named by its path relative to the folder instead.
`field-map` and `data-split` do not apply: a BIG-bench task is one list of examples, and each
client holds out its own eval split.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.data.format import as_text

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
USAGE = ("bigbench:<file or folder>: a BIG-bench task.json, or a folder of them such as a "
         "clone's bigbench/benchmark_tasks")
EXAMPLE = "{input, target or target_scores}"


def load_bigbench(spec: str) -> list[dict]:
    """Every example of a BIG-bench task file, or of every task in a folder, as records."""
    if not spec.strip():
        raise FileNotFoundError(f"dataset 'bigbench:' names no file or folder; pass {USAGE}")
    path = Path(spec).expanduser()
    if path.is_file():
        task = read_task(path)
        return task_records(path, task, task_name(path, task))
    if not path.is_dir():
        raise FileNotFoundError(f"BIG-bench task {path} does not exist; pass {USAGE}")
    tasks = find_tasks(path)
    if not tasks:
        raise ValueError(f"{path}: no BIG-bench task in this folder or below it (no .json file "
                         f"that is an object with 'examples'); pass {USAGE}")
    names = unique_names(path, tasks)
    return [record for (file, task), name in zip(tasks, names)
            for record in task_records(file, task, name)]


def find_tasks(folder: Path) -> list[tuple[Path, dict]]:
    """(file, task object) of every BIG-bench task under `folder`, in path order; other JSON
    is skipped (hidden folders too), but a broken task.json is an error."""
    tasks = []
    for file in sorted(folder.rglob("*.json")):
        relative = file.relative_to(folder)
        if not file.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if '"examples"' not in text:  # cheap: results and metadata files are skipped unparsed
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if file.name == "task.json":
                raise ValueError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})"
                                 ) from None
            continue
        if isinstance(value, dict) and "examples" in value:
            tasks.append((file, value))
    return tasks


def read_task(path: Path) -> dict:
    """A task file's object (checked in `task_records`)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a BIG-bench task, an object with 'examples' (a list "
                         f"of {EXAMPLE}), got a JSON {type(value).__name__}")
    return value


def task_name(path: Path, task: dict) -> str:
    """The name of one task: see the module docstring."""
    if path.name == "task.json":
        folder = path.absolute().parent
        if folder.name:
            if (folder.parent / "task.json").is_file() and folder.parent.name:
                return f"{folder.parent.name}/{folder.name}"
            return folder.name
    for key in ("source_task", "name"):
        value = task.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return path.stem


def unique_names(folder: Path, tasks: list[tuple[Path, dict]]) -> list[str]:
    """Each task's name; tasks that share one are named by their path under `folder`."""
    original = [task_name(file, task) for file, task in tasks]
    names = []
    for (file, _), name in zip(tasks, original):
        relative = file.relative_to(folder)
        if original.count(name) > 1:
            name = (relative.parent if file.name == "task.json" and relative.parent.parts
                    else relative.with_suffix("")).as_posix()
        names.append(name)
    seen: dict[str, Path] = {}
    for name, (file, _) in zip(names, tasks):
        if name in seen:
            raise ValueError(f"{seen[name]} and {file} are both named task {name!r}; rename or "
                             f"move one of them")
        seen[name] = file
    return names


def text_field(task: dict, key: str, default: str, where: str) -> str:
    """A task-level prompt field (task_prefix and the prefixes), text or absent."""
    value = task.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be text, got {value!r:.80}")
    return value


def targets_of(value: object, where: str) -> list[str]:
    """`target`: a string, or a non-empty list of acceptable strings."""
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: field 'target' is an empty list; expected a string or "
                             f"a non-empty list of acceptable strings")
        return [as_text(v, "target", where) for v in value]
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return [as_text(value, "target", where)]
    raise ValueError(f"{where}: field 'target' must be a string or a list of strings, got "
                     f"{value!r:.80}")


def scores_of(value: object, where: str) -> dict[str, float]:
    """`target_scores`: a non-empty {choice text: number}."""
    ok = isinstance(value, dict) and value and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in value.values())
    if not ok or not isinstance(value, dict):
        raise ValueError(f"{where}: field 'target_scores' must be a non-empty object "
                         f"{{choice: number score}}, got {value!r:.80}")
    return dict(value)


def task_records(path: Path, task: dict, name: str) -> list[dict]:
    """A checked task's examples as records (module docstring)."""
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        got = (f"found fields {sorted(task)}" if "examples" not in task
               else f"got {examples!r:.80}")
        raise ValueError(f"{path}: expected 'examples', a non-empty list of {EXAMPLE}; {got}")
    where = str(path)
    prefix = text_field(task, "task_prefix", "", where)
    input_prefix = text_field(task, "example_input_prefix", DEFAULT_INPUT_PREFIX, where)
    output_prefix = text_field(task, "example_output_prefix", DEFAULT_OUTPUT_PREFIX, where)
    choice_prefix = text_field(task, "choice_prefix", DEFAULT_CHOICE_PREFIX, where)
    append = task.get("append_choices_to_input", True)
    if not isinstance(append, bool):
        raise ValueError(f"{where}: field 'append_choices_to_input' must be true or false, got "
                         f"{append!r:.80}")
    records = []
    for i, example in enumerate(examples):
        at = f"{path}: examples[{i}]"
        if not isinstance(example, dict):
            raise ValueError(f"{at}: expected an object {EXAMPLE}, got a JSON "
                             f"{type(example).__name__}")
        if "input" not in example:
            raise ValueError(f"{at}: expected 'input', found fields {sorted(example)}")
        if "target" not in example and "target_scores" not in example:
            raise ValueError(f"{at}: expected 'target' or 'target_scores', found fields "
                             f"{sorted(example)}")
        text = as_text(example["input"], "input", at)
        record: dict = {"task": name}
        extra = targets_of(example["target"], at) if "target" in example else []
        if "target_scores" in example:
            scores = scores_of(example["target_scores"], at)
            choices = list(scores)
            best = max(scores.values())
            targets = [c for c in choices if scores[c] == best]
            targets += [t for t in extra if t not in targets]
            if append:
                text += choice_prefix + choice_prefix.join(choices)
            record.update(choices=choices, target_scores=scores)
        else:
            targets = extra
        prompt = (prefix + input_prefix + text + output_prefix).strip()
        records.append({"instruction": prompt, "output": targets[0], **record,
                        "targets": targets})
    return records
