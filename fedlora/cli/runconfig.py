"""Parse Flower-style `--run-config "k=v k2=v2"` strings and TOML scenario files."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

from fedlora.config import BIGBENCH_PREFIX, HUB_PREFIX


def parse_value(text: str) -> Any:
    """A TOML value (int, float, bool, quoted string); a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_run_config(text: str) -> dict[str, Any]:
    """'k=v k2="a b"' -> {k: v, k2: "a b"}; raises ValueError on a pair without '='."""
    out = {}
    for pair in shlex.split(text):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--run-config: expected key=value pairs, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


# settings that name a data source: a file or folder (or bigbench:<file or folder>) is read by
# processes that do not share the command's working directory (Ray workers, the ServerApp)
SOURCE_KEYS = ("dataset", "server-eval-data", "data-path")
NOT_LOCAL = ("builtin:", HUB_PREFIX)  # sources that are no path on this machine


def absolute_source(key: str, value: str, flag: str | None = None) -> str:
    """A data source whose local path is resolved against the working directory, so that
    every process reads the same file; a missing path is an error naming it (builtin: and
    hf: sources are returned as they are)."""
    if not value or value.startswith(NOT_LOCAL):
        return value
    prefix = BIGBENCH_PREFIX if value.startswith(BIGBENCH_PREFIX) else ""
    path = Path(value.removeprefix(prefix)).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"{flag or f'setting {key!r}'}: {path} does not exist (relative paths are read from "
            f"the directory the command runs in, {Path.cwd()}); pass a data file, a "
            f"save_to_disk folder, {BIGBENCH_PREFIX}<task.json or folder>, hf:<owner/name> or "
            f"builtin:<task>")
    return prefix + str(path)


def load_scenario(path: str | Path) -> dict[str, Any]:
    """A scenario file: a flat TOML table of run-config keys (plus optional num-clients)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file {path} does not exist")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    bad = [k for k, v in data.items() if isinstance(v, (dict, list))]
    if bad:
        raise ValueError(f"scenario {path}: keys {bad} must be plain values (no tables/lists)")
    return data
