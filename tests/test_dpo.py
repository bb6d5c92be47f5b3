"""objective=dpo: federated preference optimisation on the sites' own pairs. A federation of
tiny-llama clients learns to prefer the chosen responses (the held-out margin grows from 0),
with both losses, on a 4-bit base, and after SFT rounds (init-adapter); wrong record forms and
unsupported combinations are refused with the reason."""

from __future__ import annotations

import json
import random

import pytest
from fake_grid import run_inprocess

from fedlora.config import SettingsError
from fedlora.methods import load
from fedlora.outputs import read_metrics, training_rounds


def write_pairs(path, n: int = 120, seed: int = 0) -> str:
    """Arithmetic questions: the right sum is chosen, a refusal rejected (a preference that
    generalises to held-out questions)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": f"Q: what is {a} + {b}?\nA:", "chosen": f" {a + b}",
                     "rejected": " I cannot say."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


RUN = {"model": "tiny-llama", "device": "cpu", "objective": "dpo", "local-steps": 6,
       "lr": 0.01, "lora-rank": 4, "eval-examples": 16, "num-server-rounds": 2,
       "batch-size": 4, "dpo-beta": 0.5, "max-length": 64}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_a_dpo_federation_grows_the_held_out_preference_margin(tmp_path, loss):
    data = write_pairs(tmp_path / "pairs.jsonl")
    run_inprocess({**RUN, "dpo-loss": loss, "dataset": data, "output-dir": str(tmp_path)}, 2)
    rows = read_metrics(tmp_path)
    start, trained = rows[0], training_rounds(rows)
    assert start["round"] == 0 and start["pref-margin"] == pytest.approx(0.0, abs=1e-6)
    assert start["pref-pairs"] > 0
    assert [r["clients-replied"] for r in trained] == [2, 2]
    margins = [r["pref-margin"] for r in trained]
    assert margins[0] > 0 and margins[1] > margins[0]
    assert trained[-1]["pref-accuracy"] >= 0.9
    assert trained[-1]["rejected-logp"] < start["rejected-logp"]
    from fedlora.report.tables import before_after

    table = before_after(rows)  # the end-of-run table compares the preference figures too
    assert "pref-margin" in table and "pref-accuracy" in table


def test_dpo_on_a_4bit_base(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    run_inprocess({**RUN, "quantization": "4bit", "num-server-rounds": 1, "dataset": data,
                   "output-dir": str(tmp_path)}, 2)
    trained = training_rounds(read_metrics(tmp_path))
    assert trained[0]["clients-replied"] == 2 and trained[0]["pref-margin"] > 0


def test_the_server_scores_held_out_pairs_with_server_eval(tmp_path):
    """server-eval with objective=dpo: the server's own held-out pairs (a file the nodes never
    train on) get the preference figures against the base model, margin 0 at round 0."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    held = write_pairs(tmp_path / "held.jsonl", n=12, seed=5)
    run_inprocess({**RUN, "num-server-rounds": 1, "dataset": data, "fraction-evaluate": 0.0,
                   "server-eval": 10, "server-eval-data": held,
                   "output-dir": str(tmp_path)}, 2)
    rows = read_metrics(tmp_path)
    start, end = rows[0], training_rounds(rows)[-1]
    assert start["server-pref-pairs"] == end["server-pref-pairs"] == 10
    assert start["server-pref-margin"] == pytest.approx(0.0, abs=1e-6)
    assert end["server-pref-margin"] > 0 and end["server-pref-accuracy"] > 0.5
    assert end["server-eval-loss"] > 0
    assert "pref-margin" not in end  # no node evaluated


def test_sft_rounds_then_dpo_rounds(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    sft = tmp_path / "sft.jsonl"  # the chosen answers as demonstrations
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                           for r in map(json.loads, open(data, encoding="utf-8"))),
                   encoding="utf-8")
    run_inprocess({**RUN, "objective": "sft", "num-server-rounds": 1, "dataset": str(sft),
                   "eval-accuracy": 0, "output-dir": str(tmp_path / "a")}, 2)
    run_inprocess({**RUN, "num-server-rounds": 1, "dataset": data,
                   "init-adapter": str(tmp_path / "a" / "final"),
                   "output-dir": str(tmp_path / "b")}, 2)
    sft_end, rows = read_metrics(tmp_path / "a")[-1], read_metrics(tmp_path / "b")
    # DPO's round 0 is the SFT adapter (its eval loss is of the chosen responses, which the
    # SFT run's eval loss scored), and DPO moves the preference beyond where SFT left it
    assert rows[0]["eval-loss"] == pytest.approx(sft_end["eval-loss"], rel=1e-5)
    assert rows[-1]["pref-margin"] > rows[0]["pref-margin"] + 0.1


def test_record_forms_and_combinations_are_refused_with_the_reason(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n" * 1, encoding="utf-8")
    from fedlora.data.preference import for_objective

    with pytest.raises(ValueError, match="objective=dpo trains on preference records"):
        for_objective([{"instruction": "q", "output": "a", "input": ""}], "dpo", 0, str(sft))
    with pytest.raises(ValueError, match="holds preference records .* objective=dpo"):
        for_objective([{"prompt": "p", "chosen": "a", "rejected": "b", "chat": False}], "sft",
                      0, "pairs.jsonl")
    for extra, key in (({"packing": True}, "packing"),
                       ({"dpo-beta": 0}, "dpo-beta"),
                       ({"dpo-loss": "hinge"}, "dpo-loss"), ({"objective": "ppo"}, "objective")):
        with pytest.raises(SettingsError, match=f"setting '{key}'"):
            load({**RUN, **extra})


def test_the_preference_experiment_runs_every_arm_and_keeps_every_scored_answer(tmp_path):
    """simulations/experiments/preference_bigbench.py --short on two tiny multiple-choice
    tasks of our own (the shared BIG-bench data is for experiments, not tests)."""
    from simulations.experiments.preference_bigbench import ARMS, main

    for task in ("alpha", "beta"):
        (tmp_path / f"{task}.json").write_text(json.dumps({"name": task, "examples": [
            {"input": f"{task} {i} + {i}?", "target_scores": {str(2 * i): 1, str(i): 0,
                                                              "no": 0}}
            for i in range(14)]}))
    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(json.dumps([{"instruction": "Pick.", "input": f"Q{i}\nA. a\nB. b\nC. c\nD. d",
                                 "output": "The answer is: B. b", "class": "x"}
                                for i in range(3)]))
    out = tmp_path / "out"
    assert main(["--short", "--bigbench-dir", str(tmp_path), "--tasks", "alpha,beta",
                 "--mmlu", str(mmlu), "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    seed = results["results"]["0"]
    assert set(seed) == set(ARMS)
    assert len(seed["local"]["runs"]) == 2  # one adapter per site
    answers = seed["dpo"]["runs"][0]["choices"]["answers"]
    assert len(answers) == 16 and all(len(a["logliks"]) == 3 for a in answers)
    assert len(seed["base"]["runs"][0]["mmlu"]["answers"]) == 3
    assert "| sft-dpo |" in (out / "results.md").read_text()


def test_the_preference_experiment_reports_seeds_run_apart_together_and_resumes(tmp_path):
    """Seeds run by separate processes into one --output-dir are reported together, and
    --resume keeps the arms a seed already has (no training: a stored seed file)."""
    from simulations.experiments.preference_bigbench import main

    out = tmp_path / "out"
    for seed, acc in ((0, 0.5), (1, 0.7)):
        (out / f"seed-{seed}").mkdir(parents=True)
        (out / f"seed-{seed}" / "results.json").write_text(json.dumps({
            "args": {"tasks": "a,b", "model": "m", "rounds": "2", "local_steps": "10"},
            "questions": {"train": 4, "test": 2, "mmlu": 0}, "seed": seed,
            "arms": {"base": {"choice-accuracy": acc, "runs": []}}}))
    assert main(["--report-only", "--arms", "base", "--output-dir", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "| base | 0.600 | 0.500 / 0.700 | - |" in table
    assert set(json.loads((out / "results.json").read_text())["results"]) == {"0", "1"}
    for task in ("a", "b"):
        (tmp_path / f"{task}.json").write_text(json.dumps({"name": task, "examples": [
            {"input": f"{i}?", "target_scores": {"yes": 1, "no": 0}} for i in range(10)]}))
    with pytest.raises(SystemExit, match="other arguments"):
        main(["--resume", "--short", "--bigbench-dir", str(tmp_path), "--tasks", "a,b",
              "--mmlu-limit", "0", "--arms", "base", "--output-dir", str(out)])
