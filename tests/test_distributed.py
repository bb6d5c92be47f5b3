"""Data-parallel local training (fedlora/train/distributed.py): W processes that each train
their slice of every micro-batch and sum gradients give the adapter one process gives with the
same global batch; device specs parse or are refused clearly."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import Workspace
from fedlora.config import Settings, SettingsError
from fedlora.data import client_records, collate, tokenize
from fedlora.devices import DeviceSpecError, resolve
from fedlora.train.distributed import (
    ReplicaJob,
    ReplicaPool,
    adapter_parameters,
    labelled_tokens,
    rank_slice,
    refusal,
)
from fedlora.train.hooks import LocalTraining
from fedlora.train.loop import RoundPlan, train_local

TOLERANCE = 1e-5  # max abs difference between the W-process and the 1-process adapter


# ---- pure pieces ----

@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (7, 3), (8, 8), (3, 8)])
def test_rank_slices_are_contiguous_balanced_and_cover_the_batch_in_order(n, world):
    items = list(range(n))
    slices = [rank_slice(items, world, r) for r in range(world)]
    assert sum(slices, []) == items
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="expected 0 <= rank < world"):
        rank_slice([1, 2], 2, 2)


def test_labelled_tokens_count_what_the_loss_averages_over(tiny_slot):
    from fedlora.train.loss import response_loss

    examples = tiny_examples(tiny_slot, 5)
    batch = collate(examples, tiny_slot.tokenizer.pad_token_id)
    _, count = response_loss(tiny_slot.model, batch)
    assert labelled_tokens(examples) == count > 0


@pytest.mark.parametrize("spec, device, cuda, expected", [
    ("auto", "auto", 0, ["auto"]), ("auto", "auto", 1, ["auto"]),
    ("auto", "auto", 8, [f"cuda:{i}" for i in range(8)]), ("auto", "cuda:3", 8, ["cuda:3"]),
    ("auto", "cpu", 4, ["cpu"]), ("1", "cuda:1", 2, ["cuda:1"]),
    ("2", "auto", 4, ["cuda:0", "cuda:1"]), ("0,2", "auto", 4, ["cuda:0", "cuda:2"]),
    ("cuda:1, cuda:0", "auto", 2, ["cuda:1", "cuda:0"]), ("cpu:2", "auto", 0, ["cpu", "cpu"]),
])
def test_device_specs_resolve_to_one_device_per_process(spec, device, cuda, expected):
    assert resolve(spec, device, cuda) == expected


@pytest.mark.parametrize("spec, why", [
    ("0", "a count must be >= 1"), ("cpu:0", "cpu:N needs a process count"),
    ("cpu:x", "cpu:N needs a process count"), ("gpu", "each listed device must be a CUDA"),
    ("0,0", "a device is listed twice"), ("cuda:1", "a list names two or more devices"),
    ("-1", "each listed device"), ("", "each listed device"),
])
def test_bad_device_specs_are_refused_saying_what_is_expected(spec, why):
    with pytest.raises(SettingsError, match="setting 'devices': expected auto, a count N") as err:
        Settings.from_config({"devices": spec})
    assert why in str(err.value)


def test_a_device_that_is_not_visible_is_refused_naming_it():
    with pytest.raises(DeviceSpecError, match="asks for cuda:2, but 2 CUDA device"):
        resolve("0,2", "auto", 2)


def test_shard_with_cpu_processes_is_refused():
    with pytest.raises(SettingsError, match="setting 'shard': expected false with devices=cpu"):
        Settings.from_config({"devices": "cpu:2", "shard": True})


@pytest.mark.parametrize("extra, words", [({"dp-sgd": True, "dp-sgd-noise-multiplier": 1.0},
                                           "dp-sgd with 2 processes"),
                                          ({"peft": "lora-moe"}, "peft=lora-moe")])
def test_what_cannot_be_split_across_processes_is_refused_with_the_fix(extra, words):
    settings = Settings.from_config({"model": "tiny-llama", **extra})
    problem = refusal(settings, LocalTraining(), 2)
    assert problem is not None and words in problem and "--devices 1" in problem
    assert refusal(settings, LocalTraining(), 1) is None
    assert refusal(Settings.from_config({}), LocalTraining(keep=lambda n: True), 2)


# ---- fedlora client --devices / --shard ----

def client_args(*flags: str):
    import argparse

    from fedlora.cli.client import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--server", "127.0.0.1:1", "--insecure", "--name", "a", *flags])


def test_fedlora_client_puts_devices_and_shard_in_the_node_config():
    from fedlora.cli.client import node_config

    assert node_config(client_args("--devices", "cpu:2"))["devices"] == "cpu:2"
    assert "devices" not in node_config(client_args())  # the default: auto
    assert node_config(client_args("--devices", "auto", "--shard"))["shard"] is True


@pytest.mark.parametrize("flags, words", [
    (["--devices", "0,0"], "a device is listed twice"),
    (["--devices", "two"], "expected auto, a count N, a list of CUDA devices"),
    (["--devices", "cpu:2", "--shard"], "'shard': expected false with devices=cpu:N"),
    (["--devices", str(torch.cuda.device_count() + 2)],
     f"but {torch.cuda.device_count()} CUDA device(s) are visible"),
])
def test_fedlora_client_refuses_bad_devices_at_once(flags, words):
    from fedlora.cli.client import node_config

    with pytest.raises(ValueError, match="setting 'devices'|setting 'shard'") as err:
        node_config(client_args(*flags))
    assert words in str(err.value)


@pytest.mark.slow  # starts replica processes of its own (~25 s)
def test_a_node_with_two_cpu_processes_replies_the_adapter_of_one_process():
    """The whole path: a deployment node's train message with devices=cpu:2 (the ClientApp
    starts its replica pool) against devices=1, over the in-process grid."""
    from fake_grid import run_inprocess

    from fedlora.train.distributed import close_pool

    def reply_of(devices: str, out) -> tuple[dict, dict]:
        got: dict = {}

        def keep(msg, reply):
            if msg.metadata.message_type == "train":
                assert not reply.has_error(), reply.error.reason
                got["arrays"] = {k: v.numpy() for k, v in
                                 reply.content.array_records["arrays"].items()}
                got["metrics"] = dict(reply.content.metric_records["metrics"])
            return reply

        run_inprocess({**RUN, "output-dir": str(out)}, 1, hook=keep,
                      node_config=lambda pid: {"node-name": "site-a", "devices": devices})
        return got["arrays"], got["metrics"]

    import tempfile
    with tempfile.TemporaryDirectory() as out:
        try:
            two, two_metrics = reply_of("cpu:2", out + "/two")
        finally:
            close_pool()
        one, one_metrics = reply_of("1", out + "/one")
    assert two.keys() == one.keys() and two
    assert max(float(abs(two[k] - one[k]).max()) for k in one) <= TOLERANCE
    assert two_metrics["train-tokens"] == one_metrics["train-tokens"]
    assert two_metrics["train-loss"] == pytest.approx(one_metrics["train-loss"], abs=1e-5)


RUN = {"model": "tiny-llama", "device": "cpu", "lora-rank": 4, "lora-dropout": 0.0,
       "local-steps": 3, "batch-size": 5, "lr": 0.01, "dataset-size": 60,
       "fraction-evaluate": 0.0, "eval-accuracy": 0, "num-server-rounds": 1,
       "min-available-nodes": 1, "min-train-nodes": 1, "min-evaluate-nodes": 1,
       "wire-dtype": "float32"}


# ---- W processes == 1 process ----

def settings_for(**extra) -> Settings:
    """Five examples per micro-batch (slices of 3 and 2), two micro-batches per step, no
    dropout (each process draws its own)."""
    return Settings.from_config({"model": "tiny-llama", "lora-rank": 4, "device": "cpu",
                                 "dataset-size": 60, "batch-size": 5, "grad-accum": 2,
                                 "local-steps": 4, "lr": 1e-2, "lora-dropout": 0.0,
                                 "max-grad-norm": 1.0, **extra})


def tiny_examples(slot, n: int | None = None) -> list[dict]:
    records, _ = client_records(Settings.from_config({"dataset-size": 60}).data, 0, 1, seed=0)
    return [tokenize(r, slot.tokenizer, 64) for r in records[:n]]


def fresh_slot(settings: Settings, start: dict[str, torch.Tensor] | None = None):
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    if start is not None:
        named = dict(slot.model.named_parameters())
        with torch.no_grad():
            for name, value in start.items():
                named[name].copy_(value)
    return slot


def started(settings: Settings) -> dict[str, torch.Tensor]:
    """A starting adapter with B != 0 (a global adapter after some rounds), so every factor
    has a gradient from the first step."""
    torch.manual_seed(1)
    slot = fresh_slot(settings)
    return {n: torch.randn_like(p) * 0.05 for n, p in
            adapter_parameters(slot.model, slot.adapter).items()}


def one_process(settings: Settings, start, examples, mu: float = 0.0):
    slot = fresh_slot(settings, start)
    result = train_local(slot.model, slot.adapter, examples, slot.tokenizer.pad_token_id,
                         settings.train, RoundPlan(1, 3, seed=7), LocalTraining(proximal_mu=mu))
    return adapter_parameters(slot.model, slot.adapter), result


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def pool():
    made = ReplicaPool(["cpu", "cpu"])
    try:
        yield made
    finally:
        made.close()
        assert not made.procs


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_two_gloo_processes_train_the_adapter_one_process_trains(pool, mu):
    settings = settings_for()
    start = started(settings)
    slot = fresh_slot(settings, start)
    examples = tiny_examples(slot)
    alone, single = one_process(settings, start, examples, mu)
    job = ReplicaJob(settings.model, settings.lora, settings.train, None, start, examples,
                     slot.tokenizer.pad_token_id, RoundPlan(1, 3, seed=7), mu, "dp")
    hooks = slot.peft.training_hooks(slot.model, slot.adapter, settings.lora,
                                     LocalTraining(proximal_mu=mu))
    result = pool.train(job, slot, hooks)
    together = adapter_parameters(slot.model, slot.adapter)
    assert max_diff(together, start) > 1e-3  # it trained
    assert max_diff(together, alone) <= TOLERANCE
    assert result.steps == single.steps == 4 and result.tokens == single.tokens
    assert result.loss == pytest.approx(single.loss, abs=1e-5)
    assert result.first_loss == pytest.approx(single.first_loss, abs=1e-5)


def tiny_pairs(slot) -> list[dict]:
    """Ten preference pairs of the default task's questions: the right answer chosen, another
    question's answer rejected."""
    from fedlora.data.preference import to_pair, tokenize_pair

    records, _ = client_records(Settings.from_config({"dataset-size": 60}).data, 0, 1, seed=0)
    return [tokenize_pair(to_pair({"prompt": r["instruction"], "chosen": r["output"],
                                   "rejected": records[i + 1]["output"]}, f"pair {i}"),
                          slot.tokenizer, 64)
            for i, r in enumerate(records[:10])]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_two_gloo_processes_train_the_dpo_adapter_one_process_trains(pool, loss):
    """objective=dpo: rank 0's reference scores travel with the job, each slice's preference
    loss is its share of the micro-batch's mean over pairs."""
    from fedlora.train.preference import dpo_training

    settings = settings_for(**{"objective": "dpo", "dpo-loss": loss, "dpo-beta": 0.5})
    start = started(settings)
    plan = RoundPlan(1, 3, seed=7)
    slot = fresh_slot(settings, start)
    pairs = tiny_pairs(slot)
    pad = slot.tokenizer.pad_token_id
    hooks = dpo_training(slot.model, LocalTraining(), pairs, pad, settings.train, plan.seed)
    assert all("ref_chosen" in p for p in hooks.examples)
    alone_slot = fresh_slot(settings, start)
    single = train_local(alone_slot.model, alone_slot.adapter, pairs, pad, settings.train, plan,
                         hooks)
    alone = adapter_parameters(alone_slot.model, alone_slot.adapter)
    job = ReplicaJob(settings.model, settings.lora, settings.train, None, start,
                     hooks.examples, pad, plan, 0.0, "dpo")
    result = pool.train(job, slot, slot.peft.training_hooks(slot.model, slot.adapter,
                                                            settings.lora, hooks))
    together = adapter_parameters(slot.model, slot.adapter)
    assert max_diff(together, start) > 1e-3  # it trained
    assert max_diff(together, alone) <= TOLERANCE
    assert result.loss == pytest.approx(single.loss, abs=1e-5)
    # without the replica's share (rank 0's slices alone) the adapter is far from it
    halves_slot = fresh_slot(settings, start)
    train_local(halves_slot.model, halves_slot.adapter, pairs, pad,
                settings_for(**{"objective": "dpo", "dpo-loss": loss, "dpo-beta": 0.5,
                                "batch-size": 3}).train, plan, hooks)
    assert max_diff(adapter_parameters(halves_slot.model, halves_slot.adapter),
                    alone) > 100 * TOLERANCE


def test_the_tolerance_tells_a_missing_gradient_sum():
    """Rank 0 without the other slices (what it trains when gradients are not summed) ends
    far outside the tolerance: the test above can fail."""
    settings = settings_for()
    start = started(settings)
    slot = fresh_slot(settings, start)
    examples = tiny_examples(slot)
    alone, _ = one_process(settings, start, examples)
    # one process on 3-example micro-batches: rank 0's slices of the 5-example ones
    halves, _ = one_process(settings_for(**{"batch-size": 3}), start, examples)
    assert max_diff(halves, alone) > 100 * TOLERANCE


def test_a_failing_replica_fails_the_task_and_the_pool_is_closed(pool):
    made = pool  # the module's pool: this test goes last
    settings = settings_for()
    slot = fresh_slot(settings)
    bad = ReplicaJob(settings.model, settings.lora, settings.train, None,
                     {"no.such.parameter": torch.zeros(1)}, tiny_examples(slot, 10),
                     slot.tokenizer.pad_token_id, RoundPlan(), 0.0, "dp")
    with pytest.raises(RuntimeError, match="replica 1 \\(cpu\\) failed(.|\\n)*lacks"):
        made.train(bad, slot, LocalTraining())
    assert not made.procs and not torch.distributed.is_initialized()


@pytest.mark.slow  # starts replica processes of its own (~25 s)
def test_a_replica_whose_node_process_was_killed_exits(tmp_path):
    """The node's process (rank 0) killed outright: its idle replica notices within
    ORPHAN_CHECK_S and exits instead of holding its device."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fedlora.train.distributed import ORPHAN_CHECK_S

    script = ("import time; from fedlora.train.distributed import ReplicaPool; "
              "pool = ReplicaPool(['cpu', 'cpu']); print(pool.procs[0].pid, flush=True); "
              "time.sleep(600)")
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    replica = None
    try:
        replica = int(node.stdout.readline())  # type: ignore[union-attr]
        node.kill()
        node.wait()
        deadline = time.monotonic() + ORPHAN_CHECK_S + 20
        while time.monotonic() < deadline and running(replica):
            time.sleep(0.5)
        assert not running(replica)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
        if replica is not None and running(replica):
            os.kill(replica, signal.SIGKILL)


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
