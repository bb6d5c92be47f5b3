"""Secure aggregation in the round loop, in one process (tests/fake_grid.py): the real
ServerApp and ClientApp on tiny-llama. The merged adapter equals the plain protocol's up to
the stated quantisation error, for each supported strategy and with sites dropping during
the protocol; the server never receives a site's factors; a forged share is refused; a node
that requires secure aggregation refuses a run without it."""

from __future__ import annotations

import pytest
import torch
from fake_grid import run_inprocess
from flwr.app import Message
from safetensors.torch import load_file

from fedlora import wire
from fedlora.outputs import read_metrics, training_rounds
from fedlora.secagg.vector import Quantizer, bits_for

BASE = {"model": "tiny-llama", "device": "cpu", "local-steps": 1, "lr": 0.01,
        "dataset-size": 60, "fraction-evaluate": 0.0, "eval-accuracy": 0,
        "num-server-rounds": 1, "min-available-nodes": 3, "min-train-nodes": 2,
        "initial-eval": False, "client-weights": "equal"}
SECURE = {"secure-aggregation": True}


def config(path, **extra) -> dict:
    return {**BASE, "output-dir": str(path), **extra}


def final(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "final" / "adapter_model.safetensors"))


def bound(sites: int, plain: torch.Tensor) -> torch.Tensor:
    """The stated error of a mean of equal-weight updates when `sites` were sampled
    (secagg-clip=1), per entry: the sum of the m in it is within m x clip / L, divided by
    the weights' sum (= m); plus
    the float32 rounding of both results (2 ulp of the value: IA3's vectors are near 1)."""
    ulp = torch.finfo(torch.float32).eps * plain.abs()
    return 1.0 / Quantizer(1.0, bits_for(sites)).levels + 2 * ulp


def assert_close(secure: dict, plain: dict, sites: int) -> None:
    assert secure.keys() == plain.keys()
    for key in plain:
        excess = (secure[key] - plain[key]).abs() - bound(sites, plain[key])
        assert excess.max().item() <= 0, (key, excess.max().item())
    assert any((plain[k] != 0).any() for k in plain)  # not trivially equal


def stage_of(msg: Message) -> str | None:
    record = msg.content.config_records.get(wire.SECAGG)
    return None if record is None else str(record.get(wire.SECAGG_STAGE))


def silent_at(stage: str, *nodes: int, attempts: int = 1):
    """A reply hook: `nodes` say nothing at `stage` (their first `attempts` times)."""
    seen: dict[int, int] = {}

    def hook(msg: Message, reply: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node in nodes and stage_of(msg) == stage:
            seen[node] = seen.get(node, 0) + 1
            if seen[node] <= attempts:
                return None
        return reply
    return hook


@pytest.mark.parametrize("extra", [
    {"strategy": "fedavg"},
    {"strategy": "ffa-lora"},
    {"strategy": "fedsa-lora"},
    {"strategy": "fedavg", "peft": "dora"},
    {"strategy": "fedavg", "peft": "ia3"},
    # sites of three ranks: each sends its whole factors zero-padded to the global rank
    {"strategy": "hetlora", "client-ranks": "2,4,8", "hetlora-weighting": "examples"},
    # each expert over its trainers (per-expert weight groups): client assigns 3 sites to 2
    # experts (expert 0 twice), learned trains every expert everywhere
    {"strategy": "lora-moe", "peft": "lora-moe", "moe-experts": 2, "moe-top-k": 1,
     "moe-assign": "client", "lora-rank": 2},
    {"strategy": "lora-moe", "peft": "lora-moe", "moe-experts": 2, "moe-top-k": 1,
     "moe-assign": "learned", "lora-rank": 2},
])
def test_secure_merge_equals_the_plain_merge(tmp_path, extra):
    replies: list[Message] = []

    def keep(msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type == "train":
            replies.append(reply)
        return reply

    run_inprocess(config(tmp_path / "plain", **extra), 3)
    run_inprocess(config(tmp_path / "secure", **extra, **SECURE), 3, hook=keep)
    assert_close(final(tmp_path / "secure"), final(tmp_path / "plain"), 3)
    assert len(replies) == 3 and all(not r.content.array_records for r in replies)
    [line] = training_rounds(read_metrics(tmp_path / "secure"))
    assert line["clients-replied"] == 3 and line["bytes-up"] > 0


def test_a_site_dropping_after_sharing_its_keys_is_left_out(tmp_path):
    run_inprocess(config(tmp_path / "plain"), 3, silent={1001})
    run_inprocess(config(tmp_path / "secure", **SECURE), 3,
                  hook=silent_at("collect-masked", 1001))
    # 3 sampled sites set the bits; the mean of the 2 in the sum is within one step
    assert_close(final(tmp_path / "secure"), final(tmp_path / "plain"), 3)
    [line] = training_rounds(read_metrics(tmp_path / "secure"))
    assert line["clients-replied"] == 2
    assert [f["node-id"] for f in line["failures"]] == [1001]
    assert "collect-masked: no reply" in line["failures"][0]["reason"]


def test_a_site_dropping_after_its_masked_vector_arrived_is_recovered(tmp_path):
    run_inprocess(config(tmp_path / "plain"), 3)
    run_inprocess(config(tmp_path / "secure", **SECURE), 3, hook=silent_at("unmask", 1001))
    assert_close(final(tmp_path / "secure"), final(tmp_path / "plain"), 3)
    [line] = training_rounds(read_metrics(tmp_path / "secure"))
    assert line["clients-replied"] == 3  # its vector is in the sum


@pytest.mark.parametrize("silent", [(), (1001,)])
def test_signed_keys_and_survivors_in_the_round_loop(tmp_path, silent):
    """Every node signs with its node key and accepts only its peers' keys
    (fedlora.secagg.signing): the round runs the consistency stage, and its merge equals the
    plain one; a site silent at consistency is still in the sum (the others' signatures
    reach the threshold)."""
    from clients.secagg import PEERS, SIGNING_KEY
    from fedlora.cli.certs import make_node_key

    for pid in range(3):
        make_node_key(tmp_path, f"site{pid}")
    peers = tmp_path / "peers.txt"
    peers.write_bytes(b"".join((tmp_path / f"site{pid}.pub").read_bytes() for pid in range(3)))
    stages: list[tuple[int, str | None]] = []

    def hook(msg: Message, reply: Message) -> Message | None:
        stages.append((msg.metadata.dst_node_id, stage_of(msg)))
        return None if msg.metadata.dst_node_id in silent and \
            stage_of(msg) == "consistency" else reply

    run_inprocess(config(tmp_path / "plain"), 3)
    run_inprocess(config(tmp_path / "secure", **SECURE), 3, hook=hook, node_config=lambda pid: {
        SIGNING_KEY: str(tmp_path / f"site{pid}"), PEERS: str(peers)})
    assert sorted(n for n, stage in stages if stage == "consistency") == [1000, 1001, 1002]
    assert sorted(n for n, stage in stages if stage == "unmask") == [1000, 1001, 1002]
    assert_close(final(tmp_path / "secure"), final(tmp_path / "plain"), 3)
    [line] = training_rounds(read_metrics(tmp_path / "secure"))
    assert line["clients-replied"] == 3


def test_a_node_with_a_larger_minimum_sum_refuses_the_round_before_training(tmp_path):
    """Node 1000 joins only sums of 4 or more sites (secagg-min-sites); the server sampled 3:
    it refuses with the reason, untrained, and the other two are summed."""
    from clients.secagg import MIN_SITES

    run_inprocess(config(tmp_path / "secure", **SECURE), 3,
                  node_config=lambda pid: {MIN_SITES: 4} if pid == 0 else {})
    [line] = training_rounds(read_metrics(tmp_path / "secure"))
    assert line["clients-replied"] == 2
    [failure] = line["failures"]
    assert failure["node-id"] == 1000
    assert "only in sums of at least 4 sites" in failure["reason"]
    assert "sampled 3" in failure["reason"]


def test_more_drops_than_secagg_dropout_fail_the_attempt_and_the_round_is_retried(tmp_path):
    run_inprocess(config(tmp_path / "plain"), 3)
    run_inprocess(config(tmp_path / "secure", **SECURE, **{"secagg-dropout": 1}), 3,
                  hook=silent_at("unmask", 1001, 1002))
    [line] = training_rounds(read_metrics(tmp_path / "secure"))
    [attempt] = line["failed-attempts"]
    assert "shares of node" in attempt["secagg-error"]
    assert "more than secagg-dropout=1" in attempt["secagg-error"]
    assert line["clients-replied"] == 3
    assert_close(final(tmp_path / "secure"), final(tmp_path / "plain"), 3)


def test_a_forged_share_is_refused_by_its_holder(tmp_path):
    def forge(msg: Message, reply: Message) -> Message:
        if msg.metadata.dst_node_id == 1000 and stage_of(msg) == "share-keys":
            record = reply.content.config_records[wire.SECAGG]
            sealed = list(record[wire.SECAGG_SEALED])
            sealed[0] = sealed[0][:-8] + bytes(8)  # for the first neighbour: 1001
            record[wire.SECAGG_SEALED] = sealed
        return reply

    run_inprocess(config(tmp_path, **SECURE), 3, hook=forge)
    [line] = training_rounds(read_metrics(tmp_path))
    [failure] = line["failures"]
    assert failure["node-id"] == 1001 and "does not open" in failure["reason"]
    assert line["clients-replied"] == 2


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_run(tmp_path):
    require = lambda pid: {wire.REQUIRE_SECURE_AGGREGATION: True} if pid == 2 else {}
    run_inprocess(config(tmp_path / "plain"), 3, node_config=require)
    [line] = training_rounds(read_metrics(tmp_path / "plain"))
    [failure] = line["failures"]
    assert failure["node-id"] == 1002 and "requires secure aggregation" in failure["reason"]
    run_inprocess(config(tmp_path / "secure", **SECURE), 3, node_config=require)
    [line] = training_rounds(read_metrics(tmp_path / "secure"))
    assert line["failures"] == [] and line["clients-replied"] == 3


def test_a_site_inflating_its_weight_beyond_one_fails_the_attempt(tmp_path):
    """A hostile site may send any integers; the server cannot see them, but a sum of the
    weights above one per site shows that one did, and the attempt is retried."""
    from flwr.app import Array, ArrayRecord

    from clients.secagg import MASKED

    done: list[int] = []

    def inflate(msg: Message, reply: Message) -> Message:
        if msg.metadata.dst_node_id == 1000 and stage_of(msg) == "collect-masked" and not done:
            done.append(1)
            y = reply.content.array_records[MASKED][MASKED].numpy().copy()
            y[-1] = (int(y[-1]) + 2 ** 29) % 2 ** 32  # + 1.0 weight at 3 sites' 30 bits
            reply.content.array_records[MASKED] = ArrayRecord({MASKED: Array(y)})
        return reply

    run_inprocess(config(tmp_path, **SECURE), 3, hook=inflate)
    [line] = training_rounds(read_metrics(tmp_path))
    [attempt] = line["failed-attempts"]
    assert "each site weighs at most 1" in attempt["secagg-error"]
    assert line["clients-replied"] == 3


def test_distributed_dp_noise_and_epsilon_match_the_central_mechanism(tmp_path):
    """With dp-noise-multiplier each site clips and adds N(0, (z C)^2 / (m - d)) before
    masking: the merged mean differs from the noiseless secure merge by noise of std
    z C sqrt(m / (m - d)) / m per entry (delta-W scale; B in PEFT scale: / the LoRA scale),
    and the epsilon reported is the central mechanism's."""
    from fedlora.methods import load
    from server.privacy import PrivacyLedger

    z, c, m, d = 0.01, 1.0, 3, 1
    clipped = {**SECURE, "clip-norm": c, "dp-clipping": "client"}
    run_inprocess(config(tmp_path / "clean", **clipped), m)
    run_inprocess(config(tmp_path / "noised", **clipped, **{"dp-noise-multiplier": z}), m)
    clean, noised = final(tmp_path / "clean"), final(tmp_path / "noised")
    std = z * c * (m / (m - d)) ** 0.5 / m
    scale = load(config(tmp_path))[0].lora.scale(8)
    for suffix, want in ((".lora_A.weight", std), (".lora_B.weight", std / scale)):
        diff = torch.cat([(noised[k] - clean[k]).flatten() for k in clean
                          if k.endswith(suffix)]).double()
        assert diff.numel() > 2000
        assert diff.std().item() == pytest.approx(want, rel=0.1)
        assert abs(diff.mean().item()) < 4 * want / diff.numel() ** 0.5
    [line] = training_rounds(read_metrics(tmp_path / "noised"))
    central = PrivacyLedger(z, 1e-5, BASE["min-available-nodes"])
    central.record()
    assert line["dp-epsilon"] == pytest.approx(central.epsilon())


def test_an_expert_in_the_sum_of_one_site_is_named_in_the_log(tmp_path, caplog):
    """lora-moe, moe-assign=client, 3 sites and 2 experts: expert 1 has one trainer, so its
    secure sum is that site's update; the server says so."""
    import logging

    moe = {"strategy": "lora-moe", "peft": "lora-moe", "moe-experts": 2, "moe-top-k": 1,
           "moe-assign": "client", "lora-rank": 2}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_inprocess(config(tmp_path, **moe, **SECURE), 3)
    alone = [r.getMessage() for r in caplog.records if "trained by one site" in r.getMessage()]
    assert len(alone) == 1 and "expert 1 was trained by one site only" in alone[0]
