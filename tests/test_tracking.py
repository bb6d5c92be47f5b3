"""Experiment tracking (fedlora.tracking): a run logged to TensorBoard, MLflow and W&B is read
back with each library's own reader and equals metrics.jsonl; the clients' per-step loss
arrives; an unknown tracker and a missing package are clear errors before a run starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from fake_grid import run_inprocess

from fedlora.config import TRACKERS, Settings, SettingsError
from fedlora.outputs import read_metrics, training_rounds
from fedlora.tracking import (
    MLFLOW_DIR,
    TENSORBOARD_DIR,
    WANDB_DIR,
    Tracker,
    checked_steps,
    require,
    round_scalars,
    step_losses,
    thin,
    tracking_uri,
)

LOCAL_STEPS = 3
RUN = {"model": "tiny-llama", "device": "cpu", "local-steps": LOCAL_STEPS, "lr": 0.01,
       "dataset-size": 60, "fraction-evaluate": 1.0, "min-evaluate-nodes": 2,
       "eval-accuracy": 0, "num-server-rounds": 2, "min-available-nodes": 2,
       "min-train-nodes": 2, "initial-eval": False}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """One 2-client, 2-round in-process run logged to all three trackers."""
    out = tmp_path_factory.mktemp("tracked")
    run_inprocess({**RUN, "output-dir": str(out), "tracker": "tensorboard,mlflow,wandb"}, 2)
    return out


def expected(out: Path) -> tuple[dict[int, float], dict[str, list[tuple[int, float]]]]:
    """metrics.jsonl's eval-loss per round and each client's (global step, loss) points."""
    rows = training_rounds(read_metrics(out))
    losses = {r["round"]: r["eval-loss"] for r in rows}
    points: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for client, (steps, values) in step_losses(r).items():
            points.setdefault(f"client-{client}/train-loss", []).extend(zip(steps, values))
    return losses, points


def test_metrics_lines_carry_each_clients_loss_of_every_local_step(tracked_run):
    rows = training_rounds(read_metrics(tracked_run))
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["clients"]) == 2
        for c in r["clients"]:
            assert c["train-steps"] == LOCAL_STEPS
            assert c["train-loss-at"] == [1, 2, 3]
            assert c["train-loss"] == pytest.approx(sum(c["train-loss-steps"]) / LOCAL_STEPS)
    _, points = expected(tracked_run)
    assert sorted(points) == ["client-0/train-loss", "client-1/train-loss"]
    assert all([s for s, _ in p] == list(range(1, 2 * LOCAL_STEPS + 1)) for p in points.values())


def test_tensorboard_event_files_hold_the_rounds_and_the_per_step_loss(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses, points = expected(tracked_run)
    events = EventAccumulator(str(tracked_run / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    read = {e.step: e.value for e in events.Scalars("eval-loss")}
    assert read == pytest.approx(losses, rel=1e-6)  # float32 in the event file
    for tag, expected_points in points.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected_points]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected_points], rel=1e-6)
    assert {e.step for e in events.Scalars("bytes-total")} == {1, 2}


def test_mlflow_store_holds_the_rounds_and_the_per_step_loss(tracked_run):
    from mlflow.tracking import MlflowClient

    losses, points = expected(tracked_run)
    assert (tracked_run / MLFLOW_DIR / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=tracking_uri(tracked_run))
    [run] = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert run.data.params["local-steps"] == str(LOCAL_STEPS)
    history = client.get_metric_history(run.info.run_id, "eval-loss")
    assert {m.step: m.value for m in history} == losses  # float64: equal
    for tag, expected_points in points.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert got == expected_points


def test_wandb_offline_run_holds_the_rounds_and_the_per_step_loss(tracked_run):
    """Read with wandb's own reader of a run's transaction log (`wandb leet inspect --json`)."""
    losses, points = expected(tracked_run)
    [log] = (tracked_run / WANDB_DIR).glob("offline-run-*/run-*.wandb")
    wandb = Path(sys.executable).with_name("wandb")
    records = subprocess.run([str(wandb), "leet", "inspect", "--json", str(log)], check=True,
                             capture_output=True, text=True, timeout=120).stdout
    items = [json.loads(line)["history"]["item"] for line in records.splitlines()
             if line.startswith("{") and json.loads(line).get("type") == "history"]
    read = {i["round"]: i["eval-loss"] for i in items if "eval-loss" in i}
    assert read == losses
    for tag, expected_points in points.items():
        assert sorted((i["train-step"], i[tag]) for i in items if tag in i) == expected_points


def test_an_unknown_tracker_is_refused_naming_the_choices():
    with pytest.raises(SettingsError, match=r"'tracker'.*tensorboard, mlflow, wandb.*'tensorbord'"):
        Settings.from_config({"tracker": "mlflow,tensorbord"})
    assert Settings.from_config({"tracker": " none "}).federation.tracker == " none "
    assert require("") == () and require("none") == ()


def test_a_missing_package_names_the_pip_command_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(ImportError, match=r"tracker=mlflow needs the mlflow package.*"
                                          r"pip install mlflow-skinny"):
        Tracker("tensorboard,mlflow")
    with pytest.raises(ImportError, match="pip install mlflow-skinny"):
        run_inprocess({**RUN, "output-dir": str(tmp_path), "tracker": "mlflow"}, 2)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before round 1


def test_simulate_and_server_refuse_a_missing_tracker_package_before_starting(monkeypatch,
                                                                             tmp_path):
    from fedlora.cli.main import build_parser
    from fedlora.cli.simulate import build_config

    monkeypatch.setitem(sys.modules, "wandb", None)
    for command in (["simulate"], ["server", "--min-nodes", "2"]):
        args = build_parser().parse_args([*command, "--model", "tiny-llama", "--tracker",
                                          "wandb", "--output-dir", str(tmp_path)])
        with pytest.raises(ImportError, match="tracker=wandb needs the wandb package"):
            build_config(args, "num_clients" if command == ["simulate"] else "min_nodes")
    args = build_parser().parse_args(["simulate", "--tracker", "tensorboard,mlfow"])
    with pytest.raises(SettingsError, match="'mlfow' is not a tracker"):
        build_config(args)


def test_overwrite_removes_an_earlier_runs_tracker_files(tmp_path):
    from fedlora.cli.simulate import prepare_output

    for name in ("metrics.jsonl", "tensorboard/events", "mlruns/mlflow.db", "wandb/run"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("earlier run")
    prepare_output(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_others_go_on(caplog):
    from fedlora.tracking import BACKENDS, Backend

    assert sorted(BACKENDS) == sorted(TRACKERS)
    logged: list[tuple[dict, int, str]] = []

    class Broken(Backend):
        name = "broken"

        def log(self, scalars, step, axis):
            raise OSError("disk full")

    class Kept(Backend):
        name = "kept"

        def log(self, scalars, step, axis):
            logged.append((scalars, step, axis))

        def finish(self):
            logged.append(({}, -1, "finished"))

    tracker = Tracker()
    tracker.backends = [Broken(), Kept()]
    tracker.log_line({"round": 1, "eval-loss": 2.0})
    tracker.log_line({"round": 2, "eval-loss": 1.0})
    tracker.finish()
    assert logged == [({"eval-loss": 2.0}, 1, "round"), ({"eval-loss": 1.0}, 2, "round"),
                      ({}, -1, "finished")]
    assert [type(b) for b in tracker.backends] == [Kept]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "fedlora.tracking"]
    assert "tracker broken failed (OSError: disk full)" in warning


def test_thin_keeps_first_and_last_and_at_most_the_limit():
    assert thin([1.0, 2.0, 3.0], 5) == ([1, 2, 3], [1.0, 2.0, 3.0])
    values = [float(i) for i in range(1000)]
    at, kept = thin(values, 256)
    assert len(at) == 256 and at[0] == 1 and at[-1] == 1000
    assert kept == [values[i - 1] for i in at]
    assert all(b - a in (3, 4, 5) for a, b in zip(at, at[1:]))  # evenly spread


def test_checked_steps_refuses_what_thin_never_makes():
    assert checked_steps([1, 3], [0.5, 0.25], 3) == ([1, 3], [0.5, 0.25])
    assert checked_steps([1, 4], [0.5, 0.25], 3) is None  # past train-steps
    assert checked_steps([2, 1], [0.5, 0.25], 3) is None  # not increasing
    assert checked_steps([1, 2], [0.5, math.nan], 3) is None
    assert checked_steps([1], [0.5, 0.25], 3) is None
    assert checked_steps(None, None, 3) is None
    assert checked_steps(list(range(1, 300)), [0.0] * 299, 300) is None  # too many


def test_a_malformed_per_step_loss_is_left_out_of_the_row_not_the_reply():
    from flwr.app import MetricRecord

    from server.rounds import step_fields

    good = {"train-steps": 3, "train-loss-at": [1, 2, 3], "train-loss-steps": [3.0, 2.0, 1.0]}
    assert step_fields(MetricRecord(good)) == good
    bad = MetricRecord({**good, "train-loss-steps": [3.0, math.inf, 1.0]})
    assert step_fields(bad) == {"train-steps": 3}
    assert step_fields(MetricRecord({"train-loss-at": [1], "train-loss-steps": [1.0]})) == {}


def test_round_scalars_are_the_finite_numbers_of_a_line():
    line = {"round": 3, "eval-loss": 1.5, "accuracy": None, "robust": "none", "merged": True,
            "bytes-total": 1200, "client-accuracy": {"0": 0.5, "1": None},
            "exactness-per-module": {"layers.0.q_proj": 0.1},
            "clients": [{"train-loss": 2.0}]}
    assert round_scalars(line) == {"eval-loss": 1.5, "bytes-total": 1200.0,
                                   "client-accuracy/0": 0.5}


def test_report_plots_the_per_step_loss_of_a_tracked_run(tracked_run, tmp_path):
    from fedlora.report import write_report
    from fedlora.report.runs import step_loss_series

    series = step_loss_series(read_metrics(tracked_run))
    _, points = expected(tracked_run)
    assert {f"client-{c}/train-loss": list(zip(*xy)) for c, xy in series.items()} == points
    written = write_report([tracked_run], tmp_path)
    assert tmp_path / "step-loss.png" in written
    assert (tmp_path / "step-loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "![step-loss](step-loss.png)" in (tmp_path / "report.md").read_text()


def test_report_plots_accuracy_against_cumulative_mb_sent(tmp_path):
    from fedlora.report import write_report
    from fedlora.report.runs import traffic_series

    rows = [{"round": 0, "accuracy": 0.1, "bytes-total": 0},
            {"round": 1, "accuracy": 0.4, "bytes-total": 2_500_000},
            {"round": 2, "accuracy": None, "bytes-total": 5_000_000},  # nobody evaluated
            {"round": 3, "accuracy": 0.6, "bytes-total": 7_500_000}]
    assert traffic_series(rows, "accuracy") == ([0.0, 2.5, 7.5], [0.1, 0.4, 0.6])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = write_report([run])
    assert run / "report" / "accuracy-traffic.png" in written
    assert not (run / "report" / "step-loss.png").exists()  # no per-step loss: no plot
