"""Hostile or corrupt client replies: each kind is dropped with its reason, and the global
adapter after the round is bitwise the same as if the reply had never arrived."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedlora.adapters import flatten, shared_init
from fedlora.config import LoraSettings
from fedlora.methods import get_method
from server.global_adapter import GlobalAdapter
from server.record import Node
from server.rounds import RoundLoop, Rules

SHAPES = {"base_model.model.layer.q_proj": (6, 5), "base_model.model.layer.v_proj": (4, 5)}
RANK = 2
A_KEY = "base_model.model.layer.q_proj.lora_A.weight"
B_KEY = "base_model.model.layer.q_proj.lora_B.weight"


def strategy() -> RoundLoop:
    """A FedAvg round loop over two small modules, nodes 1..3 known at rank 2."""
    state = GlobalAdapter(method=get_method("fedavg"), lora=LoraSettings(rank=RANK),
                          factors=shared_init(SHAPES, RANK, seed=0), global_rank=RANK)
    s = RoundLoop(state, SHAPES, Rules(timeout=10.0, max_examples=1000, max_update_norm=100.0),
                  writer=None)
    s.nodes = {n: Node(n, rank=RANK) for n in (1, 2, 3)}
    return s


def accepted(loop: RoundLoop, msg):
    """The update of a reply the loop accepts."""
    problem, accepted = loop.check_reply(msg.metadata.src_node_id, msg)
    assert problem is None, problem
    return accepted.update


def good_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in
            flatten(shared_init(SHAPES, RANK, seed=0)).items()}


def reply(state: dict, metrics: dict, node: int = 1, records: dict | None = None):
    """A reply as the strategy reads it (content and the sender's node id)."""
    content = records if records is not None else {
        "arrays": ArrayRecord(state) if state else ArrayRecord(),
        "metrics": MetricRecord(metrics)}
    return SimpleNamespace(content=RecordDict(content),
                           metadata=SimpleNamespace(src_node_id=node))


OK = {"num-examples": 10, "lora-rank": RANK}


def with_key(key: str, value: torch.Tensor) -> dict:
    return {**good_state(1), key: value}


def without(key: str) -> dict:
    return {k: v for k, v in good_state(1).items() if k != key}


def nan_state() -> dict:
    state = good_state(1)
    state[A_KEY][0, 0] = float("nan")
    return state


CORRUPT = [  # (name, state, metrics, node, expected reason fragment)
    ("missing key", without(A_KEY), OK, 1, "missing ['" + A_KEY),
    ("extra key", with_key("base_model.model.layer.k_proj.lora_A.weight", torch.zeros(2, 5)),
     OK, 1, "unexpected ['base_model.model.layer.k_proj"),
    ("wrong shape", with_key(B_KEY, torch.zeros(6, 3)), OK, 1, "shape (6, 3), expected (6, 2)"),
    ("transposed A", with_key(A_KEY, torch.zeros(5, 2)), OK, 1, "shape (5, 2), expected (2, 5)"),
    ("transposed B", with_key(B_KEY, torch.zeros(2, 6)), OK, 1, "shape (2, 6), expected (6, 2)"),
    ("rank above the limit", {k: torch.zeros(v.shape[0], 8) if "lora_B" in k else
                              torch.zeros(8, v.shape[1]) for k, v in good_state(1).items()},
     {"num-examples": 10, "lora-rank": 8}, 1, "shape (8, 5), expected (2, 5)"),
    ("declared rank lies", good_state(1), {"num-examples": 10, "lora-rank": 1}, 1,
     "declared rank 1, but this node's rank is 2"),
    ("NaN", nan_state(), OK, 1, "contains NaN or Inf"),
    ("+Inf", with_key(B_KEY, torch.full((6, 2), float("inf"))), OK, 1, "contains NaN or Inf"),
    ("-Inf", with_key(A_KEY, torch.full((2, 5), float("-inf"))), OK, 1, "contains NaN or Inf"),
    ("huge norm", {k: v * 1e4 for k, v in good_state(1).items()}, OK, 1,
     "is above max-update-norm=100"),
    ("float64", with_key(A_KEY, torch.zeros(2, 5, dtype=torch.float64)), OK, 1,
     "dtype torch.float64 not allowed"),
    ("int32", with_key(A_KEY, torch.zeros(2, 5, dtype=torch.int32)), OK, 1,
     "dtype torch.int32 not allowed"),
    ("zero examples", good_state(1), {**OK, "num-examples": 0}, 1, "positive integer, got 0"),
    ("negative examples", good_state(1), {**OK, "num-examples": -5}, 1, "got -5"),
    ("enormous examples", good_state(1), {**OK, "num-examples": 10**12}, 1,
     "above the cap max-num-examples=1000"),
    ("fractional examples", good_state(1), {**OK, "num-examples": 3.5}, 1, "got 3.5"),
    ("no num-examples", good_state(1), {"lora-rank": RANK}, 1, "got None"),
    ("empty record", {}, OK, 1, "keys differ from the global adapter"),
    ("unknown node", good_state(1), OK, 99, "node 99 was never asked for its rank"),
]


@pytest.mark.parametrize("name, state, metrics, node, fragment", CORRUPT,
                         ids=[c[0] for c in CORRUPT])
def test_corrupt_reply_is_dropped_and_the_global_adapter_is_bitwise_unchanged(
        name, state, metrics, node, fragment):
    good = [reply(good_state(2), OK, node=2), reply(good_state(3), {**OK, "num-examples": 30},
                                                     node=3)]
    clean, hostile = strategy(), strategy()
    clean.state.update([accepted(clean, r) for r in good])
    problem, dropped = hostile.check_reply(node, reply(state, metrics, node=node))
    assert dropped is None and problem is not None and fragment in problem, problem
    hostile.state.update([accepted(hostile, r) for r in good])
    for module, (b, a) in clean.state.factors.items():
        assert torch.equal(b, hostile.state.factors[module][0])
        assert torch.equal(a, hostile.state.factors[module][1])


@pytest.mark.parametrize("records, fragment", [
    ({}, "expected one ArrayRecord and one MetricRecord"),
    ({"metrics": MetricRecord(OK)}, "expected one ArrayRecord and one MetricRecord"),
    ({"a": ArrayRecord(), "b": ArrayRecord(), "metrics": MetricRecord(OK)},
     "expected one ArrayRecord and one MetricRecord"),
])
def test_malformed_record_layouts_are_dropped(records, fragment):
    problem, dropped = strategy().check_reply(1, reply({}, OK, records=records))
    assert dropped is None and fragment in problem


def test_a_valid_reply_passes():
    problem, ok = strategy().check_reply(1, reply(good_state(1), OK))
    assert problem is None and ok.update.rank == RANK and ok.row["num-examples"] == 10
