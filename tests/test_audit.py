"""The canary audit (`fedlora audit`): canaries and their exposure, and one audited federation
on tiny-llama whose numbers come from the models the server actually received."""

from __future__ import annotations

import json
import math

import pytest

from fedlora.audit.canaries import Canary, exposure, make_canaries, planted, rank_of
from fedlora.audit.plan import AuditPlan
from fedlora.cli.main import main
from fedlora.config import SettingsError


def test_exposure_is_log2_candidates_minus_log2_rank():
    scores = [float(i) for i in range(1000)]  # candidate 999 is the most likely
    assert exposure(scores, 999) == pytest.approx(math.log2(1000))
    assert rank_of(scores, 999) == 1
    assert rank_of(scores, 0) == 1000 and exposure(scores, 0) == pytest.approx(0.0)
    assert exposure(scores, 500) == pytest.approx(math.log2(1000) - math.log2(500))  # rank 500


def test_ties_count_for_the_secret():
    assert rank_of([1.0, 2.0, 2.0, 0.5], 1) == 1  # equal to the secret is not above it


def test_a_nan_score_is_an_error_not_a_rank():
    with pytest.raises(ValueError, match="NaN"):
        rank_of([0.0, math.nan, 1.0], 0)


def test_canaries_are_seeded_distinct_and_their_candidates_hold_the_secret():
    first, again = make_canaries(3, 3, seed=7), make_canaries(3, 3, seed=7)
    assert first == again and first != make_canaries(3, 3, seed=8)
    assert len({c.person for c in first}) == 3
    for canary in first:
        candidates = canary.candidates()
        assert len(candidates) == 1000 and len(set(candidates)) == 1000
        assert candidates[canary.true_index()] == canary.secret
        assert canary.answer().endswith(" ".join(map(str, canary.secret)) + ".")


def test_planting_adds_each_canary_copies_times_and_keeps_every_record():
    records = [{"instruction": f"q{i}", "output": "a"} for i in range(20)]
    canaries = [Canary("Ines Varga", "safe code", (4, 7, 1)),
                Canary("Oskar Brandt", "alarm PIN", (0, 0, 9))]
    out = planted(records, canaries, copies=3, seed=0)
    assert len(out) == 26
    assert [r for r in out if r.get("task") != "canary"] == records
    for canary in canaries:
        assert sum(r == canary.record() for r in out) == 3


def test_an_unknown_arm_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        AuditPlan(arms=["default", "homomorphic"]).check()


def test_an_arm_whose_settings_do_not_load_is_refused_naming_it(tmp_path):
    from fedlora.audit.run import check_arms

    plan = AuditPlan(model="tiny-llama", arms=["default"], run_config={"lora-rank": 0})
    with pytest.raises(SettingsError, match="audit arm 'default'.*lora-rank"):
        check_arms(plan, tmp_path)


@pytest.mark.slow
def test_audit_on_tiny_llama_reads_the_secret_from_the_reply_the_server_received(tmp_path,
                                                                                 capsys):
    """One site memorises a 1-digit canary (10 candidates); the reply the server received,
    loaded as an adapter, ranks the secret first, and results.json keeps every score. Each
    view's scoring is reported as it ends; one round's final adapter is its sum, scored
    once."""
    out = tmp_path / "audit"
    code = main(["audit", "--model", "tiny-llama", "--arms", "default", "--sites", "2",
                 "--records-per-site", "1", "--copies", "16", "--digits", "1",
                 "--local-steps", "60", "--accuracy-examples", "2", "--output-dir", str(out),
                 "--run-config", "lr=0.003 lora-dropout=0 max-share=1"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    arm = report["arms"][0]
    assert set(arm["views"]) == {"base", "reply", "sum", "final"}
    reply = arm["views"]["reply"][0]
    assert len(reply["scores"]) == 10
    assert reply["rank"] == 1 and reply["exposure"] == pytest.approx(math.log2(10))
    assert arm["views"]["reply"][0]["scores"] != arm["views"]["base"][0]["scores"]
    assert (out / "summary.md").read_text().startswith("| arm | base | reply | sum | final |")
    assert arm["views"]["final"] == arm["views"]["sum"]
    err = capsys.readouterr().err
    assert "scoring 1 canary(ies) x 10 candidates" in err
    for view in ("base", "reply", "sum"):
        assert f"arm default: {view}: " in err
    assert "arm default: final: " not in err


def test_cached_candidate_scores_equal_scoring_each_answer_whole(tiny_slot):
    """The audit scores 10**digits answers with the shared prompt run once (cached); each
    score equals choice_logliks' (prompt and answer as one sequence), the oracle."""
    from fedlora.audit.run import candidate_scores
    from fedlora.train.accuracy import question_prompt
    from fedlora.train.choices import choice_logliks

    model, tokenizer = tiny_slot.model, tiny_slot.tokenizer
    canary = Canary("Ines Varga", "safe code", (4, 7))
    fast = candidate_scores(model, tokenizer, canary, batch_size=32)
    whole = choice_logliks(model, tokenizer, question_prompt(canary.record(), tokenizer),
                           [canary.answer(c) for c in canary.candidates()])
    assert len(fast) == 100
    assert fast == pytest.approx(whole, abs=1e-3)


# ---- fedlora exposure: a secret of the user's own ----------------------------------------------

def test_own_secret_candidates_keep_its_shape_and_bad_input_is_refused():
    from fedlora.audit.canaries import OwnSecret

    spaced = OwnSecret("Code?", "The code is {secret}.", "4 7")
    assert len(spaced.candidates()) == 100 and spaced.candidates()[spaced.true_index()] == "4 7"
    assert spaced.candidates()[:2] == ["0 0", "0 1"]
    tagged = OwnSecret("Badge?", "Badge {secret}", "A-12")
    assert tagged.candidates()[12] == "A-12" and tagged.answers()[5] == "Badge A-05"
    for bad, words in ((("Code?", "no placeholder", "47"), "with {secret}"),
                       (("Code?", "{secret}", "1234567"), "1 to 6 digits"),
                       (("Code?", "{secret}", "abc"), "1 to 6 digits"),
                       ((" ", "{secret}", "47"), "--prompt")):
        with pytest.raises(ValueError, match=words):
            OwnSecret(*bad)


def test_fedlora_exposure_reads_a_planted_secret_from_a_runs_adapter(tmp_path, capsys):
    """A site's raw-text records hold a secret; after a run, `fedlora exposure` ranks it first
    under the run's adapter, above where the base model ranks it (the user's own check)."""
    from fake_grid import run_inprocess

    data = tmp_path / "site.jsonl"
    rows = [{"prompt": f"Note {i}:", "completion": f" item {i} is filed."} for i in range(8)]
    rows += [{"prompt": "The badge of Ines Varga:", "completion": " B-4 7"}] * 24
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run_inprocess({"model": "tiny-llama", "device": "cpu", "dataset": str(data),
                   "local-steps": 60, "lr": 0.01, "lora-rank": 8, "batch-size": 4,
                   "lora-dropout": 0.0,
                   "num-server-rounds": 1, "fraction-evaluate": 0.0, "eval-accuracy": 0,
                   "initial-eval": False, "eval-fraction": 0.05, "min-available-nodes": 1,
                   "min-train-nodes": 1,
                   "output-dir": str(tmp_path / "run")}, 1)
    code = main(["exposure", "--model", "tiny-llama", "--adapter",
                 f"final={tmp_path / 'run' / 'final'}", "--prompt", "The badge of Ines Varga:",
                 "--answer", " {secret}", "--secret", "B-4 7", "--raw",
                 "--output-dir", str(tmp_path / "exp")])
    assert code == 0
    views = json.loads((tmp_path / "exp" / "exposure.json").read_text())["views"]
    assert views["final"]["rank"] == 1 and views["final"]["candidates"] == 100
    assert views["final"]["exposure"] == pytest.approx(math.log2(100))
    assert views["base"]["rank"] > 1
    assert "final" in capsys.readouterr().out


def test_fedlora_exposure_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    code = main(["exposure", "--model", "tiny-llama", "--adapter", str(tmp_path),
                 "--prompt", "Code?", "--answer", "{secret}", "--secret", "12"])
    assert code == 2 and "adapter_config.json" in capsys.readouterr().err


def test_documented_fedlora_exposure_commands_parse_and_name_a_valid_secret():
    """Every `fedlora exposure` line of README.md and docs/ parses, and its secret, prompt and
    answer make a valid OwnSecret (nothing is run: the adapters are a user's)."""
    import shlex
    from pathlib import Path

    from test_scaling import ROOT, documented

    from fedlora.audit.canaries import OwnSecret
    from fedlora.cli.main import build_parser

    lines = [line for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for line in documented(Path(path), "fedlora exposure")]
    assert len(lines) >= 2
    for line in lines:
        words = shlex.split(line)
        args = build_parser().parse_args(words[words.index("fedlora") + 1:])
        secret = OwnSecret(args.prompt, args.answer, args.secret, raw=args.raw)
        assert secret.candidates()[secret.true_index()] == args.secret
