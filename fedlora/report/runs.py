"""A finished run read back from its output folder, and the series the report plots.

A metric may be missing from some rounds (or every round) or be NaN (no client evaluated):
such points are skipped, so newer keys show up in plots when present and older runs still
load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.outputs import METRICS
from fedlora.tracking import CLIENT_PREFIX, client_name, finite, step_losses
from fedlora.wire import M

ACCURACY = M.ACCURACY
FAMILY_PREFIX = M.ACCURACY + "/"


@dataclass
class Run:
    """One output folder: its metrics rows, its run.json and a legend label."""

    path: Path
    rows: list[dict]
    info: dict = field(default_factory=dict)
    name: str = ""  # the folder name, or its path when two runs share a name

    @property
    def label(self) -> str:
        """Legend label: `strategy (name)`."""
        return f"{self.strategy} ({self.name or self.path.name})"

    @property
    def strategy(self) -> str:
        """The merging strategy from run.json, or '?' when run.json is absent."""
        return str(self.info.get("settings", {}).get("strategy", "?"))


def load_run(path: str | Path) -> Run:
    """Read metrics.jsonl (required, one round at least) and run.json (optional)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder; expected the --output-dir of a "
                                f"fedlora run (it holds {METRICS})")
    metrics = path / METRICS
    if not metrics.is_file():
        raise FileNotFoundError(f"{path} holds no {METRICS}; expected the --output-dir of a "
                                f"fedlora run that completed at least one round")
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{metrics}, line {number}: not JSON ({err.msg})") from err
    if not rows:
        raise ValueError(f"{metrics} is empty: the run completed no round yet")
    info_file = path / "run.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return Run(path=path, rows=rows, info=info)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run, named by its folder; full paths tell equal folder names apart."""
    runs = [load_run(p) for p in paths]
    unique = len({r.path.name for r in runs}) == len(runs)
    for run in runs:
        run.name = run.path.name if unique else str(run.path)
    return runs


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of `key`, skipping rounds where it is missing or not finite."""
    points = [(r[M.ROUND], finite(r.get(key))) for r in rows]
    kept = [(n, v) for n, v in points if v is not None]
    return [n for n, _ in kept], [v for _, v in kept]


def cumulative(rows: list[dict], keys: tuple[str, ...]) -> tuple[list[int], list[float]]:
    """(rounds, running total of the sum of `keys` per round); missing keys count 0."""
    total, values = 0.0, []
    for r in rows:
        total += sum(finite(r.get(k)) or 0.0 for k in keys)
        values.append(total)
    return [r[M.ROUND] for r in rows], values


def last(rows: list[dict], key: str) -> float | None:
    """The value of `key` in the latest round that has a finite one."""
    values = series(rows, key)[1]
    return values[-1] if values else None


def accuracy_families(rows: list[dict]) -> list[str]:
    """Task families with an `accuracy/<family>` key in any round, sorted."""
    return sorted({k[len(FAMILY_PREFIX):] for r in rows for k in r if k.startswith(FAMILY_PREFIX)})


def client_metrics(rows: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{metric: {client: (rounds, values)}} of per-client values.

    Sources: each round's `clients` list (train-loss of each reply, by partition id, else by
    node id) and any `client-<metric>` dict {partition-id: value}.
    """
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}

    def add(metric: str, client, round_: int, value) -> None:
        if finite(value) is not None:
            rounds, values = out.setdefault(metric, {}).setdefault(str(client), ([], []))
            rounds.append(round_)
            values.append(float(value))

    for r in rows:
        for c in r.get(M.CLIENTS) or []:
            pid = c.get(M.PARTITION_ID, -1)
            add("train-loss", pid if pid is not None and pid >= 0 else c.get(M.NODE_ID),
                r[M.ROUND], c.get(M.TRAIN_LOSS))
        for key, per_client in r.items():
            if key.startswith(CLIENT_PREFIX) and isinstance(per_client, dict):
                for client, value in per_client.items():
                    add(key[len(CLIENT_PREFIX):], client, r[M.ROUND], value)
    return out


def client_label(entry: dict) -> str:
    """How a client row or failure is named in plots: its node name, else its partition id,
    else its node id (as the trackers name it)."""
    return client_name(entry)


def step_loss_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{client: (global steps, losses)} of the per-step training loss the clients reported
    (`train-loss-steps`), over all rounds: step (round - 1) x train-steps + local step."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        for client, (steps, losses) in step_losses(r).items():
            xs, ys = out.setdefault(client, ([], []))
            xs.extend(steps)
            ys.extend(losses)
    return out


def traffic_series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(cumulative MB sent: bytes-total, the training rounds' up and down; `key`) of the
    rounds where both are finite."""
    points = [(finite(r.get(M.BYTES_TOTAL)), finite(r.get(key))) for r in rows]
    kept = [(b / 1e6, v) for b, v in points if b is not None and v is not None]
    return [b for b, _ in kept], [v for _, v in kept]


def update_norms(rows: list[dict]) -> dict[str, list[tuple[int, float, bool]]]:
    """{client: [(round, update norm, dropped?)]}: merged replies from `clients`, replies the
    norm screen dropped from `failures` (they carry their norm)."""
    out: dict[str, list[tuple[int, float, bool]]] = {}
    for r in rows:
        for entries, dropped in ((r.get(M.CLIENTS) or [], False), (r.get(M.FAILURES) or [], True)):
            for entry in entries:
                if (norm := finite(entry.get(M.UPDATE_NORM))) is not None:
                    out.setdefault(client_label(entry), []).append((r[M.ROUND], norm, dropped))
    return out
