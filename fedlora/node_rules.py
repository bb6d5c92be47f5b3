"""What a deployment node takes from the run config, and what its error replies say.

The server of a deployment is not trusted with a site's records. Whoever writes the run config
(or runs a ServerApp of their own) must not learn a node's data, its file names or which paths
exist on it. A node started by `fedlora client` therefore (`clients.client_app` applies these
rules; they are pure functions of the run config, the node config and an exception):

* takes `field-map`, `roles-map` and `data-split` (how it reads its records) from its own
  config whenever it names its own data (`data-path`), like the paths in `NODE_PATH_KEYS`;
* refuses a run-config `dataset` of `hf:<id>` or a `model` that is, or looks like, a path on
  the node, with one message whether such a path exists or not (`source_refusal`);
* refuses a run config above one of its ceilings (`limit_refusals`, `NODE_LIMIT_KEYS`);
* answers a failed task with a generic reason and an error id (`public_reason`): the
  exception, which may quote a record or name a file, stays in the node's log.

A refusal (`Refused`) is the one exception whose text is sent as it is: it is built only from
fixed words, run-config values and the node's ceilings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fedlora.config import HUB_PREFIX, NODE_LIMIT_KEYS, Settings, SettingsError

# How a node reads its own data: with `data-path` in its node config, from there only.
NODE_DATA_KEYS = ("field-map", "roles-map", "data-split")


class Refused(SettingsError):
    """The node refuses the run config; the message names only the run config's values, the
    node's ceilings and what to change, so it is sent to the server as it is."""


class DataProblem(RuntimeError):
    """The node could not read its records as the settings describe (the cause, which may
    quote a record or name a file, is chained and stays in the node's log)."""


# The kinds of failure a reply may name: fixed words, no text from the node.
KINDS = {
    "data": "it could not read its data as the run's settings describe (data source, "
            "field-map, data-split, record form or max-length)",
    "model": "it could not load the run's model",
    "settings": "the run's settings do not fit this node's own settings",
    "memory": "it ran out of memory",
    "other": "an unexpected error",
}


def looks_local(name: str) -> bool:
    """Whether `name` is written like a path rather than a hub id `owner/name`: it starts
    with /, ., ~ or a drive, holds a backslash, os.sep other than /, .., or a second /.
    Decided from the text alone, never by looking at the node's disk."""
    seps = {"\\", os.sep} - {"/"}
    return (name.startswith(("/", ".", "~")) or (len(name) > 1 and name[1] == ":")
            or any(s in name for s in seps) or ".." in name or name.count("/") > 1
            or name.lower().endswith(".gguf"))


def source_refusal(key: str, value: str, builtins: tuple[str, ...] = ()) -> str | None:
    """Why a deployment node refuses the run config's `dataset` (`hf:` values) or `model`
    `value` (None: it is a hub id or, for `model`, a built-in name); the same words whether a
    path of that name exists on the node or not, and without the value (the reply may be
    logged where the run config is not)."""
    if key == "dataset":
        if not value.startswith(HUB_PREFIX):
            return None
        name = value[len(HUB_PREFIX):].partition(":")[0]
        if name and not looks_local(name) and name.count("/") == 1:
            return None
        return ("setting 'dataset': the run config's hf: value is not a hub id "
                "hf:<owner/name>[:<config>]; a run config may not name paths on a node "
                "(hf: included): use a hub id, builtin:<task>, or let the node name its data "
                "(fedlora client --data-path)")
    if value in builtins or (not looks_local(value) and value.count("/") == 1):
        return None
    return (f"setting 'model': the run config's model is neither a built-in model "
            f"({', '.join(builtins)}) nor a hub id owner/name; a run config may not name "
            f"paths on a node: use one of those, or let the node name its model "
            f"(fedlora client --node-config \"model=PATH\")")


def hub_refusal(settings: Settings, run: Mapping[str, Any], node_config: Mapping[str, Any],
                builtins: tuple[str, ...]) -> str | None:
    """Why a node started with --no-hub-downloads refuses the run (None: it needs no hub
    download that the run config chose): an `hf:` dataset, or a model that is not built-in."""
    if node_config.get("allow-hub-downloads", True):
        return None
    if "data-path" not in node_config and settings.data.dataset.startswith(HUB_PREFIX):
        return (f"setting 'dataset': the run config names the hub dataset "
                f"{settings.data.dataset!r}, but this node downloads nothing from the hub "
                f"(fedlora client --no-hub-downloads); use builtin:<task>, or a node that "
                f"names its own data")
    if "model" not in node_config and settings.model.name not in builtins:
        return (f"setting 'model': the run config names the hub model {run.get('model')!r}, "
                f"but this node downloads nothing from the hub (fedlora client "
                f"--no-hub-downloads); use a built-in model ({', '.join(builtins)}), or a "
                f"node that names its own model")
    return None


def round_examples(settings: Settings, evaluating: bool) -> int | None:
    """How many of its examples a node reads in one train (or evaluate) task under
    `settings` (None: all of them, eval-examples=0)."""
    train = settings.train
    if not evaluating:
        return train.local_steps * train.batch_size * train.grad_accum
    if not train.eval_examples:
        return None
    return max(train.eval_examples, train.eval_accuracy)


def limit_refusals(settings: Settings, node_config: Mapping[str, Any], evaluating: bool
                   ) -> list[str]:
    """Each ceiling of the node (`NODE_LIMIT_KEYS` in its node config) that `settings`
    exceed, as a sentence naming the setting, its value, the ceiling and the flag."""
    limits = {key: node_config[key] for key in NODE_LIMIT_KEYS if key in node_config}
    asked = {"limit-local-steps": ("local-steps", settings.train.local_steps),
             "limit-max-length": ("max-length", settings.train.max_length)}
    out = []
    for key, (name, value) in asked.items():
        if key in limits and value > limits[key]:
            out.append(f"setting '{name}': the run asks for {value}, above this node's "
                       f"ceiling of {limits[key]} (fedlora client {NODE_LIMIT_KEYS[key]}); "
                       f"lower {name} in the run config")
    if "limit-examples" in limits:
        examples = round_examples(settings, evaluating)
        if examples is None or examples > limits["limit-examples"]:
            what = ("eval-examples=0 (all of them)" if examples is None else
                    f"{examples} examples per task")
            out.append(f"settings 'local-steps' x 'batch-size' x 'grad-accum' (train) and "
                       f"'eval-examples', 'eval-accuracy' (evaluate): the run reads {what}, "
                       f"above this node's ceiling of {limits['limit-examples']} (fedlora "
                       f"client --max-examples); lower them in the run config")
    return out


def check_limits(node_config: Mapping[str, Any]) -> None:
    """Raise a SettingsError unless every ceiling in `node_config` is an integer >= 1 and
    allow-hub-downloads a boolean."""
    for key in NODE_LIMIT_KEYS:
        if key == "allow-hub-downloads":
            if key in node_config and not isinstance(node_config[key], bool):
                raise SettingsError(f"setting '{key}': expected true or false, got "
                                    f"{node_config[key]!r}")
            continue
        value = node_config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingsError(f"setting '{key}': expected an integer >= 1 (fedlora client "
                                f"{NODE_LIMIT_KEYS[key]} N), got {value!r}")


def failure_kind(exc: BaseException) -> str:
    """The key in KINDS of what went wrong, from the exception's type alone."""
    from fedlora.models.source import ModelLoadError

    if isinstance(exc, DataProblem):
        return "data"
    if isinstance(exc, ModelLoadError):
        return "model"
    if isinstance(exc, SettingsError):
        return "settings"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "memory"
    return "other"


def public_reason(node: str, task: str, exc: BaseException, error_id: str,
                  run_problem: str | None = None) -> str:
    """The reason a deployment node sends the server for a task that failed with `exc`: the
    refusal itself (a `Refused`), or a generic one naming the kind of failure and the error
    id under which the node logged the details. `run_problem` is what is wrong with the run
    config alone (its own words, checked without the node's config), where that is known."""
    if isinstance(exc, Refused):
        return f"node {node} refused the {task} task: {exc}"
    kind = KINDS[failure_kind(exc)]
    if run_problem and isinstance(exc, SettingsError):
        kind = f"the run config is not valid: {run_problem}"
    return (f"node {node} could not run the {task} task: {kind} (error id {error_id}; the "
            f"details are in the node's log)")
