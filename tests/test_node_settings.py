"""A node's own settings win (clients/client_app.py): its rank, and its files, which the run
config cannot name. Deployment nodes are modelled as `fedlora client` makes them (a
`node-name` in the node config), over the in-process grid of tests/fake_grid.py."""

from __future__ import annotations

import json

import pytest
from fake_grid import run_inprocess

from fedlora.outputs import read_metrics, training_rounds

BASE = {"model": "tiny-llama", "device": "cpu", "local-steps": 2, "lr": 0.01,
        "dataset-size": 60, "fraction-evaluate": 0.0, "eval-accuracy": 0,
        "num-server-rounds": 1, "min-available-nodes": 2}


def site(name: str, **config) -> dict:
    """The node config of a `fedlora client` node."""
    return {"node-name": name, **config}


def trained_ranks(out_dir) -> dict[int, int]:
    first = training_rounds(read_metrics(out_dir))[0]
    return {c["node-id"]: c["lora-rank"] for c in first["clients"]}


def test_each_node_trains_at_its_own_rank_not_at_the_client_ranks_cycle(tmp_path):
    # the server's client-ranks cycle would give node 0 rank 8 and node 1 rank 32
    nodes = {0: site("site-a", **{"lora-rank": 32}), 1: site("site-b", **{"lora-rank": 8})}
    run_inprocess({**BASE, "strategy": "hetlora", "client-ranks": "8,32",
                   "output-dir": str(tmp_path)}, 2, node_config=nodes.get)
    assert trained_ranks(tmp_path) == {1000: 32, 1001: 8}


def test_without_a_rank_of_its_own_a_node_takes_its_place_in_client_ranks(tmp_path):
    run_inprocess({**BASE, "strategy": "hetlora", "client-ranks": "8,32",
                   "output-dir": str(tmp_path)}, 2)
    assert trained_ranks(tmp_path) == {1000: 8, 1001: 32}


def test_the_run_config_cannot_name_files_on_a_deployment_node(tmp_path, caplog):
    """personal-dir and data-path from the run config are ignored on the nodes (with a
    warning); each node keeps its private factors where its own config says."""
    evil = tmp_path / "chosen-by-the-server"
    mine = {pid: tmp_path / f"site-{pid}" for pid in (0, 1)}
    nodes = {pid: site(f"site-{pid}", **{"personal-dir": str(folder)})
             for pid, folder in mine.items()}
    with caplog.at_level("WARNING", logger="fedlora.client"):
        run_inprocess({**BASE, "strategy": "fedsa-lora", "output-dir": str(tmp_path / "out"),
                       "personal-dir": str(evil), "data-path": str(tmp_path / "secret.jsonl")},
                      2, node_config=nodes.get)
    assert not evil.exists()
    for pid, folder in mine.items():
        assert [p.name for p in folder.iterdir()] == [f"client-{pid}.safetensors"]
    assert training_rounds(read_metrics(tmp_path / "out"))[0]["clients-replied"] == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert any("ignored personal-dir=" in w for w in warnings)
    assert any("ignored data-path=" in w for w in warnings)


def test_a_run_config_dataset_that_is_a_local_path_is_refused_on_a_deployment_node(tmp_path):
    data = tmp_path / "server-chosen.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"})
                              for i in range(40)) + "\n")
    nodes = {0: site("site-a", **{"data-path": str(data)}), 1: site("site-b")}
    run_inprocess({**BASE, "min-train-nodes": 1, "min-replies": 1, "dataset": str(data),
                   "output-dir": str(tmp_path / "out")}, 2, node_config=nodes.get)
    row = training_rounds(read_metrics(tmp_path / "out"))[0]
    assert [c["node-id"] for c in row["clients"]] == [1000]  # it has a data-path of its own
    [failure] = row["failures"]
    assert failure["node-id"] == 1001
    assert "the run config names a file on this node" in failure["reason"]
    assert "--data-path" in failure["reason"]


@pytest.mark.parametrize("dataset", ["builtin:units", "hf:someone/data"])
def test_builtin_and_hub_datasets_from_the_run_config_are_not_paths(dataset):
    from flwr.app import Context, RecordDict

    from clients.client_app import node_settings

    context = Context(run_id=1, node_id=1, node_config={"node-name": "a"}, state=RecordDict(),
                      run_config={"dataset": dataset})
    assert node_settings(context)[0].data.dataset == dataset


def test_failures_and_clients_name_the_node_and_use_the_id_it_was_sent_to(tmp_path):
    """A reply that Flower makes for a dead node carries the SuperLink's id as its sender;
    the server files it under the node the message went to, with the node's name."""
    from flwr.app import Error, Message

    def dead_node_reply(msg, reply):
        if msg.metadata.dst_node_id == 1001 and msg.metadata.message_type == "train":
            error = Message(Error(code=1, reason="ClientApp process died"), reply_to=msg)
            error.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink reports it
            return error
        return reply

    nodes = {0: site("hospital-a"), 1: site("bank-b")}
    run_inprocess({**BASE, "min-train-nodes": 1, "min-replies": 1,
                   "output-dir": str(tmp_path)}, 2, node_config=nodes.get, hook=dead_node_reply)
    row = training_rounds(read_metrics(tmp_path))[0]
    assert row["failures"] == [{"node-id": 1001, "reason": "ClientApp process died",
                                "node-name": "bank-b"}]
    assert [(c["node-id"], c["node-name"]) for c in row["clients"]] == [(1000, "hospital-a")]
