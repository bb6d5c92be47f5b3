"""A client's private factors keep the round that trained them (clients/personal.py): a
replayed round starts from what the client held when that round first began, so a resumed
fedsa-lora run is bit-exact; evaluation reads the version trained in its round."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from clients.personal import personal_store


def b(value: float) -> dict[str, torch.Tensor]:
    return {"layers.0.q_proj.lora_B.weight": torch.full((4, 2), value)}


@pytest.fixture(params=["file", "context"])
def opener(request, tmp_path):
    """personal_store(round, evaluating) on one client's files or one node's context."""
    folder = str(tmp_path) if request.param == "file" else ""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return lambda rnd, evaluating=False: personal_store(folder, context, 0, rnd, evaluating)


def value(store) -> float | None:
    tensors = store.load()
    return None if tensors is None else float(next(iter(tensors.values()))[0, 0])


def test_each_round_reads_what_the_round_before_trained(opener):
    assert value(opener(1)) is None  # nothing before round 1: the seeded init
    opener(1).save(b(1.0))
    assert value(opener(1, evaluating=True)) == 1.0  # round 1's evaluation: round 1's B
    assert value(opener(2)) == 1.0
    opener(2).save(b(2.0))
    assert value(opener(3)) == 2.0


def test_a_replayed_round_starts_from_the_version_before_it(opener):
    opener(1).save(b(1.0))
    opener(2).save(b(2.0))  # round 2 trained, then the server died before its checkpoint
    assert value(opener(2)) == 1.0  # the resumed server sends round 2 again
    opener(2).save(b(2.5))  # the replay overwrites round 2's version, keeps round 1's
    assert value(opener(2)) == 1.0 and value(opener(3)) == 2.5


def test_a_replayed_first_round_starts_from_the_seeded_init(opener):
    opener(1).save(b(1.0))
    assert value(opener(1)) is None
