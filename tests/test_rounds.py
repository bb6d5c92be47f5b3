"""The server's round loop in one process (tests/fake_grid.py): the real ServerApp and
ClientApp on tiny-llama, with nodes that crash, never answer or declare a bad rank."""

from __future__ import annotations

import json

import pytest
import torch
from fake_grid import run_inprocess
from flwr.app import Error, Message
from safetensors.torch import load_file

from fedlora.outputs import read_metrics, training_rounds
from server.rounds import RoundFailed

BASE = {"model": "tiny-llama", "device": "cpu", "local-steps": 2, "lr": 0.01,
        "dataset-size": 90, "fraction-evaluate": 0.0, "eval-accuracy": 0,
        "num-server-rounds": 2, "min-available-nodes": 3, "min-train-nodes": 2}


def config(tmp_path, **extra) -> dict:
    return {**BASE, "output-dir": str(tmp_path), **extra}


def crash_first_train_of(node: int):
    """A reply hook: `node`'s first training reply becomes an error, later ones pass."""
    seen = []

    def hook(msg: Message, reply: Message) -> Message:
        if msg.metadata.dst_node_id == node and msg.metadata.message_type == "train" \
                and node not in seen:
            seen.append(node)
            return Message(Error(code=1, reason="simulated crash"), reply_to=msg)
        return reply
    return hook


def test_a_round_short_of_min_replies_is_retried_and_then_merged(tmp_path):
    run_inprocess(config(tmp_path, **{"min-replies": 3, "round-retries": 2}), 3,
                  hook=crash_first_train_of(1001))
    first, second = training_rounds(read_metrics(tmp_path))
    assert first["clients-replied"] == 3 and first["clients-failed"] == 0
    [attempt] = first["failed-attempts"]
    assert attempt["attempt"] == 1 and attempt["replied"] == 2
    assert attempt["failures"] == [{"node-id": 1001, "reason": "simulated crash"}]
    assert second["failed-attempts"] == [] and second["clients-replied"] == 3


def test_a_fresh_run_evaluates_the_base_model_as_round_0(tmp_path):
    """Before round 1 the global model (B = 0: the base model) is evaluated like any round;
    its line has the evaluation only, and no adapter folder is written for it."""
    evaluating = {"fraction-evaluate": 1.0, "min-evaluate-nodes": 3, "eval-accuracy": 4,
                  "num-server-rounds": 1}
    run_inprocess(config(tmp_path / "on", **evaluating), 3)
    base, trained = read_metrics(tmp_path / "on")
    assert (base["round"], trained["round"]) == (0, 1)
    assert base["eval-clients"] == 3 and base["eval-failed"] == 0 and base["eval-loss"] > 0
    assert 0 <= base["accuracy"] <= 1 and set(base["client-accuracy"]) == {"0", "1", "2"}
    assert "clients" not in base and "train-loss" not in base and base["bytes-total"] == 0
    assert base["eval-loss"] != trained["eval-loss"]  # round 1 trained the adapter
    # the first 3 answers of each family (builtin:units: one), of the same questions before
    # and after, client by client, for the report
    for row in (base, trained):
        assert [s["family"] for s in row["sample-answers"]] == ["units"] * 3
        assert [s["partition-id"] for s in row["sample-answers"]] == [0, 0, 0]
    assert [(s["partition-id"], s["question"]) for s in base["sample-answers"]] == [
        (s["partition-id"], s["question"]) for s in trained["sample-answers"]]
    from fedlora.cli.simulate import summary_table
    first = base["sample-answers"][0]
    table = summary_table(tmp_path / "on")
    assert "sample answers (client held-out questions): base = round 0, federated = round 1" \
        in table and f"  base:       {' '.join(first['answer'].split())}" in table
    assert sorted(p.name for p in (tmp_path / "on" / "rounds").iterdir()) == ["1"]
    run_inprocess(config(tmp_path / "off", **evaluating, **{"initial-eval": False}), 3)
    assert [r["round"] for r in read_metrics(tmp_path / "off")] == [1]


def test_retries_exhausted_stop_the_run_naming_the_failures_and_keep_done_rounds(tmp_path):
    # node 1002 answers its rank query, then crashes on every training message from round 2
    def hook(msg, reply):
        if msg.metadata.dst_node_id == 1002 and msg.metadata.message_type == "train" and \
                int(msg.content["config"]["server-round"]) == 2:
            return Message(Error(code=1, reason="disk full"), reply_to=msg)
        return reply

    with pytest.raises(RoundFailed) as err:
        run_inprocess(config(tmp_path, **{"min-replies": 3, "round-retries": 1}), 3, hook=hook)
    message = str(err.value)
    assert "round 2: 2 valid replies, fewer than min-replies=3, in 2 attempt(s)" in message
    assert "node 1002: disk full" in message and "--resume" in message
    assert [r["round"] for r in read_metrics(tmp_path)] == [1]
    assert json.loads((tmp_path / "state" / "latest.json").read_text()) == {"round": 1}


def test_round_failure_stop_does_not_retry(tmp_path):
    grid_hook = crash_first_train_of(1000)
    with pytest.raises(RoundFailed, match="in 1 attempt\\(s\\) \\(round-failure=stop\\)"):
        run_inprocess(config(tmp_path, **{"min-replies": 3, "round-failure": "stop"}), 3,
                      hook=grid_hook)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_node_that_never_answers_is_skipped_when_min_replies_allows(tmp_path):
    grid = run_inprocess(config(tmp_path, **{"min-replies": 2}), 3, silent={1002})
    for row in training_rounds(read_metrics(tmp_path)):
        assert row["clients-replied"] == 2 and row["clients-sampled"] == 3
        assert sorted(c["node-id"] for c in row["clients"]) == [1000, 1001]
        assert [f["reason"] for f in row["failures"] if f["node-id"] == 1002] == [
            "no answer to the rank query within round-timeout=3600 s"]
    # the silent node is asked its rank again each round; it is never sent training
    assert all(m.metadata.dst_node_id != 1002 for m in grid.sent
               if m.metadata.message_type == "train")


def test_a_node_that_answers_its_rank_but_never_its_training_is_a_named_failure(tmp_path,
                                                                                caplog):
    silent_in_training = lambda msg, reply: None if (
        msg.metadata.dst_node_id == 1001 and msg.metadata.message_type == "train") else reply
    run_inprocess(config(tmp_path, **{"min-replies": 2, "round-timeout": 30}), 3,
                  hook=silent_in_training)
    for row in training_rounds(read_metrics(tmp_path)):
        assert row["clients-replied"] == 2 and row["clients-failed"] == 1
        assert row["failures"] == [{"node-id": 1001,
                                    "reason": "no reply within round-timeout=30 s"}]
    assert "round 1: node 1001 failed: no reply within round-timeout=30 s" in caplog.text


def test_a_node_declaring_a_rank_above_the_global_one_is_refused(tmp_path):
    node_config = lambda pid: {"lora-rank": 64} if pid == 1 else {}
    run_inprocess(config(tmp_path), 3, node_config=node_config)
    row = training_rounds(read_metrics(tmp_path))[0]
    assert row["clients-replied"] == 2 and row["clients-failed"] == 1
    [failure] = row["failures"]
    assert failure["node-id"] == 1001
    assert "declared LoRA rank 64, expected an integer in 1..8" in failure["reason"]


def test_every_rank_gets_its_own_payload_built_once_per_round(tmp_path):
    grid = run_inprocess(config(tmp_path, strategy="hetlora", **{"client-ranks": "4,8,8"}), 3)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    for server_round in (1, 2):
        sent = [m for m in train if int(m.content["config"]["server-round"]) == server_round]
        ranks = {m.metadata.dst_node_id: int(m.content["config"]["rank"]) for m in sent}
        assert ranks == {1000: 4, 1001: 8, 1002: 8}
        # nodes of one rank share one RecordDict (built once), other ranks get another
        contents = {r: {id(m.content) for m in sent if ranks[m.metadata.dst_node_id] == r}
                    for r in (4, 8)}
        assert all(len(ids) == 1 for ids in contents.values())
        assert contents[4] != contents[8]
    final = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())



class ServerDied(Exception):
    """The server machine losing power, in the middle of a round."""


def die_once_round_2_trained(nodes: int):
    """A reply hook: the server dies once `nodes` nodes have trained round 2."""
    trained = []

    def hook(msg, reply):
        if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 2:
            trained.append(msg.metadata.dst_node_id)
            if len(trained) == nodes:
                raise ServerDied
        return reply
    return hook


def test_a_resumed_server_still_names_the_nodes_it_learnt_before(tmp_path):
    """A resumed server knows the nodes' ranks from its checkpoint and does not ask again, so
    it must keep their names too: every clients row names its node after the resume."""
    names = lambda pid: {"node-name": f"site-{pid}"}
    settings = config(tmp_path, **{"num-server-rounds": 3})
    with pytest.raises(ServerDied):
        run_inprocess(settings, 3, node_config=names, hook=die_once_round_2_trained(3))
    run_inprocess({**settings, "resume": True}, 3, node_config=names)
    rows = training_rounds(read_metrics(tmp_path))
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert sorted(c["node-name"] for c in row["clients"]) == ["site-0", "site-1", "site-2"]


def test_fedsa_lora_resumed_after_a_round_its_nodes_had_trained_is_bit_exact(tmp_path):
    """Round 2's nodes all trained (and kept their personal B in their personal-dir), then the
    server died before round 2's checkpoint. The resumed server sends round 2 again: each node
    starts from the B it held when round 2 first began, so the final adapter and every
    personal B equal the uninterrupted run's, bit for bit."""
    def settings(out):
        return config(out, strategy="fedsa-lora", **{
            "num-server-rounds": 3, "personal-dir": str(out / "personal")})

    reference, out = tmp_path / "reference", tmp_path / "out"
    run_inprocess(settings(reference), 3)
    with pytest.raises(ServerDied):
        run_inprocess(settings(out), 3, hook=die_once_round_2_trained(3))
    assert [r["round"] for r in read_metrics(out)] == [1]
    run_inprocess({**settings(out), "resume": True}, 3)
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3]
    for name in ["final/adapter_model.safetensors",
                 *(f"personal/client-{i}.safetensors" for i in range(3))]:
        ours, theirs = load_file(str(out / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_a_merge_that_fails_is_retried_and_never_ends_the_server(tmp_path, monkeypatch):
    """A linear-algebra failure in a merge (flexlora's SVD on a reply it cannot factor) used to
    end the server run; now the attempt fails with the reason and the round is sent again."""
    from fedlora.methods.fedavg import FedAvg

    calls: list[int] = []
    original = FedAvg.combine_sum  # the merge, from the running sum or from the list

    def flaky(self, total, updates, previous, *, export_rank):
        calls.append(len(calls))
        if len(calls) == 2:  # round 2's first merge
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return original(self, total, updates, previous, export_rank=export_rank)

    monkeypatch.setattr(FedAvg, "combine_sum", flaky)
    run_inprocess(config(tmp_path, **{"num-server-rounds": 3}), 3)
    rows = training_rounds(read_metrics(tmp_path))
    assert [r["round"] for r in rows] == [1, 2, 3] and len(calls) == 4
    [attempt] = rows[1]["failed-attempts"]
    assert "failed to converge" in attempt["merge-error"]


def test_a_median_run_killed_and_resumed_is_bit_equal_to_the_uninterrupted_one(tmp_path):
    """The median's randomised re-factoring drew from the global generator, which a resumed
    server (a new process) does not share with the first one: here the resumed run's
    generator is moved on purpose on every reply."""
    run = config(tmp_path, **{"robust": "median", "robust-f": 1, "min-replies": 3,
                              "min-train-nodes": 3, "num-server-rounds": 3,
                              "target-modules": "q_proj,v_proj"})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_inprocess({**run, "output-dir": str(straight)}, 3)
    with pytest.raises(ServerDied):
        run_inprocess({**run, "output-dir": str(resumed)}, 3, hook=die_once_round_2_trained(3))

    def other_generator(msg, reply):
        torch.rand(7)  # what another process's generator would have done meanwhile
        return reply

    run_inprocess({**run, "output-dir": str(resumed), "resume": True}, 3, hook=other_generator)
    a = load_file(str(straight / "final" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_evaluation_that_raises_is_a_named_failure_in_metrics_table_and_exit_code(
        tmp_path, monkeypatch, caplog):
    """A client whose evaluation raises is named, with the reason, in metrics.jsonl's
    eval-failures of every evaluated round (round 0 too), in the end-of-run table, and the
    run's exit code is the documented degraded one; the other clients' evaluation counts.
    A server-eval that raises is named the same way (node 0, "server") and ends nothing."""
    import clients.client_app as client_app
    from fedlora.cli.simulate import EXIT_DEGRADED, exit_code, summary_table
    from server.server_eval import ServerEvaluator

    real = client_app.evaluate

    def evaluate(model, examples, pad_id, batch_size=8, desc="evaluating"):
        if evaluating[-1] == 1:
            raise RuntimeError("scorer broke on record 2")
        return real(model, examples, pad_id, batch_size, desc)

    evaluating = [-1]
    real_prepare = client_app.prepare

    def prepare(msg, context):
        evaluating.append(int(context.node_config["partition-id"]))
        return real_prepare(msg, context)

    def server_eval(self, state, rank):
        raise MemoryError("no room for a second model")

    monkeypatch.setattr(client_app, "evaluate", evaluate)
    monkeypatch.setattr(client_app, "prepare", prepare)
    monkeypatch.setattr(ServerEvaluator, "__call__", server_eval)
    run_inprocess(config(tmp_path, **{"fraction-evaluate": 1.0, "min-evaluate-nodes": 3,
                                      "num-server-rounds": 1, "server-eval": 4}), 3)
    rows = read_metrics(tmp_path)
    assert "round 1: node 1001 failed to evaluate: RuntimeError: scorer broke" in caplog.text
    assert "round 0: sent evaluation to 3 nodes" in caplog.text  # progress, and the ETA:
    assert "round 1/1 done in" in caplog.text and "that was the last round" in caplog.text
    for row in rows:  # round 0 and round 1
        assert row["eval-failures"] == [
            {"node-id": 1001, "reason": "RuntimeError: scorer broke on record 2"},
            {"node-id": 0, "node-name": "server",
             "reason": "MemoryError: no room for a second model"}]
        assert row["eval-failed"] == 1 and row["eval-clients"] == 2
        assert row["eval-loss"] > 0
    table = summary_table(tmp_path)
    header = table.splitlines()[0].split()
    column = header.index("eval-failed")
    assert [line.split()[column] for line in table.splitlines()[1:3]] == ["2", "2"]
    assert "round 0: the server (server-eval): MemoryError: no room" in table
    assert "perplexity" in header and "accuracy" not in header  # eval-accuracy=0
    assert "round 1: node 1001: RuntimeError: scorer broke on record 2" in table
    assert exit_code(0, True, rows) == EXIT_DEGRADED == 3
    clean = [{**row, "eval-failures": []} for row in rows]
    assert exit_code(0, True, clean) == 0
    assert exit_code(0, False, rows) == 1 and exit_code(7, True, rows) == 7


def test_accuracy_is_scored_for_builtin_tasks_only_by_default(tmp_path):
    """A user's jsonl without a scorer gets eval loss and perplexity, no accuracy (its
    exact matches would read 0.000 -> 0.000); builtin:arithmetic names its scorer and is
    answered at the default eval-accuracy."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Describe the number {i}.",
                                        "output": f"{i} is a number between {i - 1} and "
                                                  f"{i + 1}."}) + "\n" for i in range(60)))
    evaluating = {"fraction-evaluate": 1.0, "min-evaluate-nodes": 2, "num-server-rounds": 1,
                  "initial-eval": False, "min-available-nodes": 2, "eval-examples": 4,
                  "max-new-tokens": 4}
    del_accuracy = {k: v for k, v in BASE.items() if k != "eval-accuracy"}
    for name, dataset in (("mine", str(data)), ("sums", "builtin:arithmetic")):
        run_inprocess({**del_accuracy, **evaluating, "dataset": dataset,
                       "output-dir": str(tmp_path / name)}, 2)
    [mine] = read_metrics(tmp_path / "mine")
    assert "accuracy" not in mine and "client-accuracy" not in mine
    assert mine["eval-perplexity"] > 1 and mine["eval-clients"] == 2
    [sums] = read_metrics(tmp_path / "sums")
    assert 0 <= sums["accuracy"] <= 1 and set(sums["client-accuracy"]) == {"0", "1"}


def test_an_evaluation_reply_without_a_loss_over_any_token_is_a_failure(monkeypatch):
    """What the server names as a failed evaluation: an error reply, no metrics, no tokens
    or no loss; a diverged model's inf or NaN loss is an evaluation, not a failure."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora import wire
    from server.rounds import evaluate_problem

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as a ServerApp
        monkeypatch.setattr(TaskIdentity, key, value)

    def reply(**metrics):
        content = RecordDict({wire.METRICS: MetricRecord(metrics)} if metrics else {})
        return Message(content, dst_node_id=1, message_type="evaluate")

    assert evaluate_problem(reply(**{"eval-loss": 2.5, "eval-tokens": 40})) is None
    assert evaluate_problem(reply(**{"eval-loss": float("nan"), "eval-tokens": 40})) is None
    assert evaluate_problem(reply()) == "the evaluation reply has no MetricRecord"
    assert evaluate_problem(reply(**{"eval-loss": 2.5, "eval-tokens": 0})) == (
        "the evaluation reply has no loss over any held-out token (eval-tokens 0, "
        "eval-loss 2.5)")
    assert "eval-loss None" in evaluate_problem(reply(**{"eval-tokens": 3}))
