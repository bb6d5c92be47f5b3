"""A node's data leaves it only as its adapter (fedlora.node_rules, clients/client_app.py):
error replies of a deployment node carry no record text, no file path and no sign of whether
a path exists; how a node reads its own data, and its ceilings, are the node's own.
Deployment nodes are modelled as `fedlora client` makes them (a `node-name` in the node
config), over the in-process grid of tests/fake_grid.py."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from fake_grid import run_inprocess
from flwr.app import Context, RecordDict

from clients.client_app import node_settings
from fedlora.config import SettingsError
from fedlora.models.source import ModelLoadError
from fedlora.node_rules import (
    KINDS,
    DataProblem,
    Refused,
    limit_refusals,
    looks_local,
    public_reason,
    source_refusal,
)
from fedlora.outputs import read_metrics, training_rounds
from server.rounds import RoundFailed

BASE = {"model": "tiny-llama", "device": "cpu", "local-steps": 1, "lr": 0.01,
        "fraction-evaluate": 0.0, "eval-accuracy": 0, "num-server-rounds": 1,
        "min-available-nodes": 1, "min-train-nodes": 1, "min-evaluate-nodes": 1,
        "round-failure": "stop"}
SECRET = "PLANTED-SECRET Compute 51 + 16"  # the planted record's text
BUILTINS = ("tiny-llama", "smollm2-135m")


def planted(folder) -> str:
    """A node's private training file whose first record holds SECRET; its path."""
    path = folder / "site-a.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"{SECRET} ({i})", "output": "67"})
                              for i in range(12)) + "\n", encoding="utf-8")
    return str(path)


def context(run_config: dict, **node) -> Context:
    return Context(run_id=1, node_id=1, node_config={"node-name": "site-a", **node},
                   state=RecordDict(), run_config=run_config)


def replies(run_config: dict, node: dict, out) -> list[str]:
    """The error reasons the server received from one deployment node, over a 1-round run."""
    reasons: list[str] = []

    def keep(msg, reply):
        if reply.has_error():
            reasons.append(reply.error.reason)
        return reply

    with contextlib.suppress(RoundFailed):  # a node that fails every task stops the run
        run_inprocess({**BASE, "output-dir": str(out), **run_config}, 1,
                      node_config=lambda pid: {"node-name": "site-a", **node}, hook=keep)
    return reasons


# ---- the rules, as pure functions ----

@pytest.mark.parametrize("name", ["/etc", "./data", "../data", "~/data", "a/b/c", "C:\\data",
                                  "a\\b", "model.gguf", "x/../y"])
def test_names_written_like_paths_are_local(name):
    assert looks_local(name)


@pytest.mark.parametrize("name", ["owner/name", "HuggingFaceTB/SmolLM2-135M", "tiny-llama"])
def test_hub_ids_and_plain_names_are_not_local(name):
    assert not looks_local(name)


def test_an_hf_dataset_naming_a_path_is_refused_alike_whether_it_exists_or_not(tmp_path):
    (tmp_path / "exists").mkdir()
    here = source_refusal("dataset", f"hf:{tmp_path / 'exists'}")
    missing = source_refusal("dataset", f"hf:{tmp_path / 'missing'}")
    assert here is not None and here == missing
    assert str(tmp_path) not in here and "hf:<owner/name>" in here


@pytest.mark.parametrize("value", ["hf:owner/name", "hf:owner/name:config", "builtin:units",
                                   "site.jsonl"])
def test_hub_ids_and_other_sources_pass_the_hf_rule(value):
    assert source_refusal("dataset", value) is None


def test_a_model_path_is_refused_alike_whether_it_exists_or_not(tmp_path):
    (tmp_path / "model").mkdir()
    here = source_refusal("model", str(tmp_path / "model"), BUILTINS)
    missing = source_refusal("model", str(tmp_path / "nothing"), BUILTINS)
    assert here is not None and here == missing and str(tmp_path) not in here
    assert source_refusal("model", "tiny-llama", BUILTINS) is None
    assert source_refusal("model", "owner/name", BUILTINS) is None


def test_a_run_above_a_ceiling_is_refused_naming_the_setting_and_the_ceiling():
    settings = node_settings(context({"local-steps": 20, "max-length": 512,
                                      "batch-size": 2}))[0]
    node = {"limit-local-steps": 10, "limit-max-length": 512, "limit-examples": 30}
    train = limit_refusals(settings, node, evaluating=False)
    assert len(train) == 2
    assert "'local-steps': the run asks for 20, above this node's ceiling of 10" in train[0]
    assert "--max-local-steps" in train[0]
    assert "40 examples per task" in train[1] and "ceiling of 30" in train[1]
    # eval-examples 32 > 30; at the ceiling (max-length 512) nothing is said
    assert len(limit_refusals(settings, node, evaluating=True)) == 2
    assert limit_refusals(settings, {"limit-local-steps": 20}, evaluating=False) == []


def test_eval_examples_zero_reads_everything_and_exceeds_any_example_ceiling():
    settings = node_settings(context({"eval-examples": 0}))[0]
    [problem] = limit_refusals(settings, {"limit-examples": 10**6}, evaluating=True)
    assert "eval-examples=0 (all of them)" in problem


def test_a_public_reason_names_the_kind_and_error_id_but_no_text_of_the_exception():
    leak = ValueError(f"/data/site-a.jsonl:1: 'messages' must be ..., got {SECRET}")
    data = DataProblem(f"client 0 could not read its data: {leak}")
    reason = public_reason("site-a", "train", data, "3f2a9c1e")
    assert reason == (f"node site-a could not run the train task: {KINDS['data']} (error id "
                      f"3f2a9c1e; the details are in the node's log)")
    assert KINDS["model"] in public_reason("site-a", "train", ModelLoadError(SECRET), "1")
    assert KINDS["other"] in public_reason("site-a", "train", leak, "1")
    assert public_reason("a", "query", Refused("setting 'x': no"), "1") == (
        "node a refused the query task: setting 'x': no")
    assert "the run config is not valid: bad lr" in public_reason(
        "a", "train", SettingsError(SECRET), "1", run_problem="bad lr")


# ---- node_settings on a deployment node ----

def test_a_node_with_its_own_data_reads_it_with_its_own_field_map_and_split(caplog):
    run = {"field-map": "messages=instruction", "data-split": "secret",
           "roles-map": "bot=assistant"}
    with caplog.at_level("WARNING", logger="fedlora.client"):
        own = node_settings(context(run, **{"data-path": "/d.jsonl",
                                            "field-map": "output=answer",
                                            "roles-map": "robot=assistant"}))[0]
        bare = node_settings(context(run, **{"data-path": "/d.jsonl"}))[0]
    assert (own.data.field_map, own.data.data_split) == ("output=answer", "train")
    assert own.data.roles_map == "robot=assistant"
    assert (bare.data.field_map, bare.data.data_split, bare.data.roles_map) == ("", "train", "")
    warnings = [r.getMessage() for r in caplog.records]
    assert any("ignored field-map='messages=instruction'" in w for w in warnings)
    assert any("ignored data-split='secret'" in w for w in warnings)
    assert any("ignored roles-map='bot=assistant'" in w for w in warnings)
    # without data of its own, the node reads the run's dataset the run's way
    assert node_settings(context(run))[0].data.field_map == "messages=instruction"


@pytest.mark.parametrize("run", [{"dataset": "hf:/srv/data"}, {"dataset": "hf:./data:cfg"},
                                 {"model": "/models/llama"}, {"model": "~/model"}])
def test_the_run_config_cannot_name_a_path_on_a_node_through_hf_or_model(run):
    with pytest.raises(Refused, match="a run config may not name paths on a node"):
        node_settings(context(run))


def test_a_node_without_hub_downloads_refuses_hub_datasets_and_models():
    node = {"allow-hub-downloads": False}
    with pytest.raises(Refused, match="--no-hub-downloads"):
        node_settings(context({"dataset": "hf:owner/name"}, **node))
    with pytest.raises(Refused, match="hub model 'owner/name'"):
        node_settings(context({"model": "owner/name"}, **node))
    # its own model and data, and built-in ones, are fine
    node_settings(context({"model": "owner/name"}, **node, model="tiny-llama"))
    node_settings(context({"model": "tiny-llama", "dataset": "builtin:units"}, **node))


def test_ceilings_are_checked_on_the_node_for_the_task_at_hand():
    node = {"limit-examples": 8}
    run = {"local-steps": 2, "batch-size": 4, "eval-examples": 16, "eval-accuracy": 4}
    node_settings(context(run, **node), "train")  # 8 examples: at the ceiling
    with pytest.raises(Refused, match="16 examples per task, above this node's ceiling of 8"):
        node_settings(context(run, **node), "evaluate")


# ---- replies of a node to crafted run configs (in-process grid) ----

def test_a_field_map_from_the_run_config_no_longer_reads_a_nodes_own_file(tmp_path):
    data = planted(tmp_path)
    reasons = replies({"field-map": "messages=instruction"}, {"data-path": data},
                      tmp_path / "out")
    assert reasons == []  # the node read its file its own way and trained
    assert training_rounds(read_metrics(tmp_path / "out"))[0]["clients-replied"] == 1


def test_a_nodes_own_data_error_reaches_the_server_without_text_or_path(tmp_path, caplog):
    data = planted(tmp_path)
    node = {"data-path": data, "field-map": "messages=instruction"}  # the node's own mistake
    with caplog.at_level("ERROR", logger="fedlora.client"):
        reasons = replies({}, node, tmp_path / "out")
    assert reasons, "the node should have failed"
    for reason in reasons:
        assert SECRET not in reason and "Compute" not in reason
        assert data not in reason and "site-a.jsonl" not in reason and str(tmp_path) not in reason
        assert KINDS["data"] in reason
    error_id = re.search(r"error id ([0-9a-f]{8})", reasons[0]).group(1)
    logged = "\n".join(r.getMessage() + str(r.exc_info[1]) for r in caplog.records
                       if r.exc_info)
    assert f"error id {error_id}" in logged and SECRET in logged  # the details stay on the node


def test_an_hf_path_gets_the_same_reply_whether_it_exists_or_not(tmp_path):
    """(A run-config model path is refused by the same rule; fedlora's own ServerApp cannot
    even start with one, so tests/test_deployment.py sends it from a ServerApp of its own.)"""
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "API_KEY.txt").write_text("API_KEY=sk-live-123\n")
    seen = {}
    for name in ("exists", "missing"):
        reasons = replies({"dataset": f"hf:{tmp_path / name}", "field-map": "messages=text"},
                          {}, tmp_path / f"out-{name}")
        assert reasons and all("sk-live" not in r and str(tmp_path) not in r for r in reasons)
        seen[name] = reasons
    assert seen["exists"] == seen["missing"]


def test_a_simulated_node_keeps_the_full_message(tmp_path):
    """No node-name: the operator is the data owner, and the reply names what failed."""
    data = planted(tmp_path)
    reasons: list[str] = []

    def keep(msg, reply):
        if reply.has_error():
            reasons.append(reply.error.reason)
        return reply

    with pytest.raises(RoundFailed):
        run_inprocess({**BASE, "output-dir": str(tmp_path / "out"), "dataset": data,
                       "field-map": "messages=instruction"}, 1, hook=keep)
    assert reasons and SECRET in reasons[0]


def test_fedlora_client_stores_its_ceilings_in_the_node_config():
    import argparse

    from fedlora.cli.client import add_arguments, node_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--server", "127.0.0.1:9092", "--insecure", "--name", "site-a"]
    config = node_config(parser.parse_args([*base, "--max-local-steps", "5", "--max-length",
                                            "128", "--max-examples", "64",
                                            "--no-hub-downloads"]))
    assert {k: config[k] for k in ("limit-local-steps", "limit-max-length", "limit-examples",
                                   "allow-hub-downloads")} == {
        "limit-local-steps": 5, "limit-max-length": 128, "limit-examples": 64,
        "allow-hub-downloads": False}
    assert "allow-hub-downloads" not in node_config(parser.parse_args(base))
    with pytest.raises(SettingsError, match="'limit-examples': expected an integer >= 1 "
                                            r"\(fedlora client --max-examples N\), got 0"):
        node_config(parser.parse_args([*base, "--max-examples", "0"]))
