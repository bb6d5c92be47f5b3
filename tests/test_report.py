"""fedlora report: PNG plots and report.md from metrics.jsonl; the table simulate prints."""

import json
import math

import pytest

from fedlora.cli.main import main
from fedlora.report import before_after, load_run, round_table, write_report
from fedlora.report.runs import client_metrics, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, strategy, rows):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"model": "tiny-llama",
                                                 "settings": {"strategy": strategy}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def rounds(n, loss0, accuracy=False):
    """n rounds of plausible metrics; bytes-total is cumulative as the server writes it."""
    rows, total = [], 0
    for r in range(1, n + 1):
        row = {"round": r, "train-loss": loss0 / r, "eval-loss": loss0 / r + 0.5,
               "eval-perplexity": math.exp(loss0 / r + 0.5), "exactness": 0.01 / r,
               "clients-replied": 2, "clients-failed": 0, "bytes-up": 1_000_000,
               "bytes-down": 2_000_000, "bytes-down-eval": 500_000, "seconds": 1.25,
               "clients": [{"node-id": 11, "partition-id": 0, "train-loss": loss0 / r},
                           {"node-id": 12, "partition-id": 1, "train-loss": loss0 / r + 1}]}
        total += 3_500_000
        row["bytes-total"] = total
        if accuracy:
            row.update({"accuracy": 0.2 * r, "accuracy/dates": 0.1 * r, "accuracy/units": 0.3 * r,
                        "client-accuracy": {"0": 0.25 * r, "1": 0.15 * r}})
        rows.append(row)
    return rows


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000, path


def test_one_run_writes_valid_pngs_and_a_summary(tmp_path, capsys):
    run = write_run(tmp_path / "fedavg-run", "fedavg", rounds(3, 3.0))
    assert main(["report", str(run)]) == 0
    out = run / "report"
    printed = capsys.readouterr().out.split()
    names = {"loss.png", "perplexity.png", "exactness.png", "bytes.png", "clients-train-loss.png",
             "report.md"}
    assert {p.split("/")[-1] for p in printed} == names
    for name in names - {"report.md"}:
        assert_png(out / name)
    assert not (out / "accuracy.png").exists()  # no accuracy key: no plot, no column
    md = (out / "report.md").read_text()
    # final train loss 3/3, eval 1.5, 3 x 3.5 MB, 3 x 1.25 s
    assert "| `fedavg-run` | fedavg | 3 | 1.0000 | 1.5000 | 10.50 | 3.8 |" in md
    assert "accuracy" not in md
    assert "![loss](loss.png)" in md and "![bytes](bytes.png)" in md


def test_two_runs_overlaid_with_accuracy(tmp_path):
    a = write_run(tmp_path / "a", "fedavg", rounds(4, 2.0, accuracy=True))
    b = write_run(tmp_path / "b", "flexlora", rounds(2, 4.0))
    written = write_report([a, b], tmp_path / "cmp")
    assert {p.name for p in written} >= {"accuracy.png", "clients-accuracy.png", "loss.png"}
    for path in written[:-1]:
        assert_png(path)
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| final accuracy |" in md
    assert "| `a` | fedavg | 4 | 0.5000 | 1.0000 | 0.8000 | 14.00 | 5.0 |" in md
    assert "| `b` | flexlora | 2 | 2.0000 | 2.5000 | n/a | 7.00 | 2.5 |" in md


def test_missing_values_and_nan_are_skipped(tmp_path):
    rows = rounds(3, 3.0)
    rows[1]["eval-loss"] = float("nan")  # json writes NaN when no client evaluated
    del rows[2]["eval-loss"]
    run = load_run(write_run(tmp_path / "r", "fedavg", rows))
    assert series(run.rows, "eval-loss") == ([1], [3.5])
    assert client_metrics(run.rows)["train-loss"]["1"] == ([1, 2, 3], [4.0, 2.5, 2.0])


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such run folder"),
    (lambda d: d.mkdir(), "holds no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("\n")), "is empty"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("{oops\n")), "line 1: not JSON"),
])
def test_bad_run_folder_exits_2_with_a_message(tmp_path, capsys, setup, message):
    setup(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "report").exists()


def test_round_table_shows_accuracy_only_when_reported():
    plain = round_table(rounds(2, 3.0))
    assert "accuracy" not in plain.splitlines()[0]
    lines = round_table(rounds(2, 3.0, accuracy=True)).splitlines()
    assert lines[0].split()[:4] == ["round", "train-loss", "eval-loss", "accuracy"]
    assert lines[2].split()[:4] == ["2", "1.500", "2.000", "0.400"]


def test_update_norms_per_client_show_the_dropped_outlier(tmp_path):
    rows = rounds(2, 3.0)
    for row in rows:
        for c, norm in zip(row["clients"], (1.0, 1.5)):
            c["update-norm"] = norm
        row["update-norm-bound"] = 10.0
        row["failures"] = [{"node-id": 13, "partition-id": 2, "update-norm": 4e5,
                            "reason": "update norm 4e+05 is 4e+05 times ..."}]
    run = write_run(tmp_path / "attacked", "fedavg", rows)
    from fedlora.report.runs import update_norms

    norms = update_norms(load_run(run).rows)
    assert norms == {"0": [(1, 1.0, False), (2, 1.0, False)],
                     "1": [(1, 1.5, False), (2, 1.5, False)],
                     "2": [(1, 4e5, True), (2, 4e5, True)]}
    written = write_report([run])
    assert_png(run / "report" / "update-norms.png")
    assert run / "report" / "update-norms.png" in written
    # a run without update norms (older metrics) has no such plot
    plain = write_run(tmp_path / "plain", "fedavg", rounds(2, 3.0))
    assert not any(p.name == "update-norms.png" for p in write_report([plain]))


def base_round(accuracy=0.05, loss=4.0):
    """Round 0 as the server writes it: the base model's evaluation, nothing trained."""
    return {"round": 0, "failures": [], "eval-loss": loss, "eval-clients": 2, "eval-failed": 0,
            "accuracy": accuracy, "accuracy/dates": 0.0, "accuracy/units": 0.1,
            "client-accuracy": {"0": 0.1, "1": 0.0}, "seconds": 2.0, "bytes-total": 0}


def test_before_after_compares_round_0_with_the_last_round(tmp_path):
    rows = [base_round(), *rounds(3, 3.0, accuracy=True)]
    table = before_after(rows).splitlines()
    assert table[0].split() == ["base", "(round", "0)", "federated", "(round", "3)", "change"]
    cells = {line[:22].strip(): line[22:].split() for line in table[1:]}
    assert cells["accuracy"] == ["0.050", "0.600", "+0.550"]
    assert cells["accuracy/units"] == ["0.100", "0.900", "+0.800"]
    assert cells["eval-loss"] == ["4.000", "1.500", "-2.500"]
    assert cells["accuracy of client 0"] == ["0.100", "0.750", "+0.650"]
    assert before_after(rounds(3, 3.0, accuracy=True)) == ""  # no round 0: nothing to compare
    # the report and the per-round table show round 0 too
    run = write_run(tmp_path / "r", "fedavg", rows)
    write_report([run])
    md = (run / "report" / "report.md").read_text()
    assert "| base accuracy (round 0) |" in md and "| `r` | fedavg | 3 |" in md
    assert "| 0.0500 | 0.6000 |" in md and "## base model and federated adapter: `r`" in md
    lines = round_table(rows).splitlines()
    assert lines[1].split()[:4] == ["0", "n/a", "4.000", "0.050"]
    assert series(load_run(run).rows, "accuracy")[0] == [0, 1, 2, 3]  # plots start at round 0


def test_sample_answers_show_the_base_and_the_federated_answer_of_the_same_questions(tmp_path):
    def samples(answers, right):
        return [{"family": "units", "question": f"Convert {i} km to m.", "expected": f"{i}000",
                 "answer": a, "correct": r, "partition-id": 0}
                for i, (a, r) in enumerate(zip(answers, right), start=1)]

    rows = [{**base_round(), "sample-answers": samples(["1 km is\nfar", "2"], [False, False])},
            *rounds(2, 3.0)]
    rows[-1]["sample-answers"] = samples(["1000", "200"], [True, False])
    from fedlora.report import sample_answers

    assert sample_answers(rows).splitlines() == [
        "sample answers (client held-out questions): base = round 0, federated = round 2", "",
        "[units, client 0] Convert 1 km to m.", "  expected:   1000",
        "  base:       1 km is far  (wrong)", "  federated:  1000  (right)", "",
        "[units, client 0] Convert 2 km to m.", "  expected:   2000",
        "  base:       2  (wrong)", "  federated:  200  (wrong)"]
    assert sample_answers(rows[1:]) == ""  # no round 0: nothing to compare
    run = write_run(tmp_path / "r", "fedavg", rows)
    write_report([run])
    md = (run / "report" / "report.md").read_text()
    assert "## sample answers, base and federated: `r`" in md and "federated:  1000" in md
