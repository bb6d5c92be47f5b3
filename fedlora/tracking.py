"""Experiment tracking: a run's metrics to TensorBoard, MLflow or W&B (`tracker`, default none).

`tracker=tensorboard,mlflow,wandb` (any of them, comma-separated) makes the ServerApp log every
metrics.jsonl line as it writes it: the round's scalars (eval-loss, accuracy, bytes-total,
merge-seconds, ...) at step = round, and each client's per-step training loss, which the
clients send back in their reply metrics (`train-loss-steps`, at most 256 values, thinned
evenly), as `client-<name>/train-loss` at the global step (round - 1) x train-steps + i.
Everything stays under the output dir, nothing goes over the network:

- tensorboard: event files in `<output-dir>/tensorboard/` (`tensorboard --logdir ...`);
- mlflow: an SQLite store `<output-dir>/mlruns/mlflow.db`, experiment `fedlora`
  (`mlflow ui --backend-store-uri sqlite:///<output-dir>/mlruns/mlflow.db`);
- wandb: an offline run in `<output-dir>/wandb/` (`wandb sync <output-dir>/wandb/offline-run-*`).

One interface, `Tracker`: start(run_name, config, output_dir) / log(scalars, step) /
finish(). A backend's package is imported only when it is chosen; `require()` imports them
before a run starts, so a missing package is a clear error naming the pip command, not a
crash after the first round. The packages are the optional extra `fedlora[tracking]`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.config import TRACKERS, SettingsError
from fedlora.runtime.quiet import install_filters, is_quiet
from fedlora.wire import MAX_STEP_LOSSES, M

# backend -> (module imported, what to pip install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"),
            "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_DB = "mlflow.db"
WANDB_DIR = "wandb"
TRACKER_DIRS = (TENSORBOARD_DIR, MLFLOW_DIR, WANDB_DIR)  # under output-dir
EXPERIMENT = "fedlora"  # the MLflow experiment and the W&B project
ROUND_AXIS = "round"  # the step of a round's scalars
STEP_AXIS = "train-step"  # the step of the clients' per-step loss
# their loggers chatter at INFO (MLflow's "Creating initial MLflow database tables...")
LOGGERS = ("mlflow", "alembic", "wandb")
log = logging.getLogger("fedlora.tracking")
CLIENT_PREFIX = "client-"  # a per-client dict of a metrics line: client-accuracy, ...


def names(spec: str) -> tuple[str, ...]:
    """The backends of a `tracker` value: '' or 'none' is none, else comma-separated names
    of TRACKERS (each once, in the order given)."""
    chosen: list[str] = []
    for part in spec.split(","):
        name = part.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            raise SettingsError(f"setting 'tracker': expected a comma-separated list of "
                                f"{', '.join(TRACKERS)} (or none), got {spec!r}: {name!r} is "
                                f"not a tracker")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def require(spec: str) -> tuple[str, ...]:
    """The backends of `spec`, each package imported: an ImportError naming the pip command
    when one is not installed (call before a run starts)."""
    chosen = names(spec)
    for name in chosen:
        module, package = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"tracker={name} needs the {module} package, which is not "
                              f"installed ({err}): pip install {package} (or pip install "
                              f"'fedlora[tracking]' for all three), or leave {name} out of "
                              f"tracker") from err
    return chosen


def thin(values: list[float], limit: int) -> tuple[list[int], list[float]]:
    """At most `limit` of `values`, evenly spread, the first and the last always among them:
    (1-based positions, values)."""
    n = len(values)
    if n <= limit:
        return list(range(1, n + 1)), list(values)
    if limit <= 1:
        return [n], [values[-1]]
    at = sorted({round(j * (n - 1) / (limit - 1)) for j in range(limit)})
    return [i + 1 for i in at], [values[i] for i in at]


def checked_steps(at: Any, losses: Any, steps: int) -> tuple[list[int], list[float]] | None:
    """A reply's per-step loss as `thin` made it, or None when it is not that: two lists of
    one length <= MAX_STEP_LOSSES, increasing local steps in 1..steps, finite losses."""
    if not isinstance(at, list) or not isinstance(losses, list) or len(at) != len(losses) \
            or not 0 < len(at) <= MAX_STEP_LOSSES:
        return None
    if any(isinstance(i, bool) or not isinstance(i, int) for i in at) \
            or at != sorted(set(at)) or at[0] < 1 or at[-1] > steps:
        return None
    values = [finite(v) for v in losses]
    if any(v is None for v in values):
        return None
    return list(at), [float(v) for v in values if v is not None]


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def round_scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl line: every finite top-level number but the round,
    and each entry of a per-client dict {client: number} (client-accuracy) as `key/client`
    (not exactness-per-module and other dicts: hundreds of charts on a large model)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key == M.ROUND:
            continue
        if isinstance(value, dict) and key.startswith(CLIENT_PREFIX):
            for sub, v in value.items():
                if (number := finite(v)) is not None:
                    out[f"{key}/{sub}"] = number
        elif (number := finite(value)) is not None:
            out[key] = number
    return out


def client_name(row: dict[str, Any]) -> str:
    """A client row's name in a tracker and the report: its node name, else its partition id,
    else its node id."""
    if row.get(M.NODE_NAME):
        return str(row[M.NODE_NAME])
    pid = row.get(M.PARTITION_ID, -1)
    return str(pid if pid is not None and pid >= 0 else row.get(M.NODE_ID))


def step_losses(entry: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    """{client: (global steps, losses)} of one metrics.jsonl line: each client row's
    per-step loss at (round - 1) x train-steps + its local step."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in entry.get(M.CLIENTS) or []:
        losses, at = row.get(M.TRAIN_LOSS_STEPS), row.get(M.TRAIN_LOSS_AT)
        steps = row.get(M.TRAIN_STEPS)
        if not losses or not at or not isinstance(steps, int):
            continue
        first = (entry[M.ROUND] - 1) * steps
        out[client_name(row)] = ([first + i for i in at], [float(v) for v in losses])
    return out


class Backend:
    """One tracking library (the subclasses); `Tracker` drives them."""

    name = ""

    def start(self, run_name: str, config: dict[str, Any], out_dir: Path) -> None:
        raise NotImplementedError

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class TensorBoard(Backend):
    """Event files under <output-dir>/tensorboard (torch's SummaryWriter)."""

    name = "tensorboard"

    def start(self, run_name: str, config: dict[str, Any], out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR))
        self.writer.add_text("settings", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class MLflow(Backend):
    """A run of experiment `fedlora` in the SQLite store <output-dir>/mlruns/mlflow.db (no
    server; MLflow 3 refuses a new file store)."""

    name = "mlflow"

    def start(self, run_name: str, config: dict[str, Any], out_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        root = out_dir / MLFLOW_DIR
        root.mkdir(parents=True, exist_ok=True)
        quieten()
        self.client = MlflowClient(tracking_uri=tracking_uri(out_dir))
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(
                             EXPERIMENT, artifact_location=(root / "artifacts").as_uri()))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in sorted(config.items())]
        for i in range(0, len(params), 100):  # MLflow takes 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow's names: letters, digits, _ - . space : / (a node may name itself otherwise)
        metrics = [Metric(re.sub(r"[^\w\-. :/]", "_", k), v, now, step)
                   for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB(Backend):
    """An offline W&B run under <output-dir>/wandb: never the network (`wandb sync` uploads
    it later; wandb-core's error reports off unless WANDB_ERROR_REPORTING says otherwise).
    Round scalars are plotted against `round`, the per-step loss against `train-step` (W&B's
    own step only grows, so each is a custom x axis)."""

    name = "wandb"

    def start(self, run_name: str, config: dict[str, Any], out_dir: Path) -> None:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # wandb-core: no Sentry
        import wandb

        self.defined: set[str] = set()
        self.run = wandb.init(
            project=EXPERIMENT, name=run_name, config=config, dir=str(out_dir),
            mode="offline", reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                    save_code=False, disable_git=True))
        quieten()
        for axis in (ROUND_AXIS, STEP_AXIS):
            self.run.define_metric(axis, hidden=True)

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        for key in scalars.keys() - self.defined:
            self.run.define_metric(key, step_metric=axis)
            self.defined.add(key)
        self.run.log({**scalars, axis: step})

    def finish(self) -> None:
        self.run.finish()


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TensorBoard, MLflow, WandB)}


def tracking_uri(out_dir: str | Path) -> str:
    """The MLflow tracking URI of a run's store (what `mlflow ui --backend-store-uri` takes)."""
    return f"sqlite:///{(Path(out_dir) / MLFLOW_DIR / MLFLOW_DB).resolve()}"


def quieten() -> None:
    """Quiet output (fedlora.runtime.quiet): the libraries' INFO chatter hidden too (they set
    their loggers' levels when imported)."""
    if is_quiet():
        install_filters()
        for name in LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """The chosen backends together (none: every call does nothing)."""

    def __init__(self, spec: str = "") -> None:
        self.backends = [BACKENDS[name]() for name in require(spec)]

    def start(self, run_name: str, config: dict[str, Any], out_dir: str | Path) -> None:
        for backend in self.backends:
            backend.start(run_name, config, Path(out_dir))

    def log(self, scalars: dict[str, float], step: int, axis: str = ROUND_AXIS) -> None:
        if scalars:
            for backend in list(self.backends):
                self.guarded(backend, backend.log, scalars, step, axis)

    def guarded(self, backend: Backend, call: Callable[..., None], *args: Any) -> None:
        """call(*args); a backend that fails is dropped with a warning, and the run goes on
        (metrics.jsonl, written first, has every round)."""
        try:
            call(*args)
        except Exception as err:
            log.warning("fedlora: tracker %s failed (%s: %s); the run goes on without it, "
                        "metrics.jsonl has every round", backend.name, type(err).__name__, err)
            self.backends.remove(backend)

    def log_line(self, entry: dict[str, Any]) -> None:
        """One metrics.jsonl line: its scalars at step = round, each client's per-step loss
        as client-<name>/train-loss at its global step."""
        if not self.backends:
            return
        self.log(round_scalars(entry), entry[M.ROUND])
        by_step: dict[int, dict[str, float]] = {}
        for client, (steps, losses) in step_losses(entry).items():
            for step, loss in zip(steps, losses):
                by_step.setdefault(step, {})[f"client-{client}/{M.TRAIN_LOSS}"] = loss
        for step in sorted(by_step):
            self.log(by_step[step], step, STEP_AXIS)

    def finish(self) -> None:
        for backend in list(self.backends):
            self.guarded(backend, backend.finish)
