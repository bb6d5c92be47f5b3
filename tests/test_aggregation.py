"""FedAvg of LoRA factors against hand-computed numbers."""

import pytest
import torch

from fedlora.aggregation import STRATEGIES, ClientUpdate, get_strategy
from fedlora.aggregation.fedavg import fedavg


def update(b, a, weight):
    return ClientUpdate({"m": (torch.tensor(b, dtype=torch.float32),
                               torch.tensor(a, dtype=torch.float32))}, weight)


def test_weights_one_and_two_give_a_plus_2b_over_3():
    merged = fedavg([update([[3.0]], [[6.0, 0.0]], 1), update([[0.0]], [[0.0, 3.0]], 2)])
    b, a = merged["m"]
    assert torch.allclose(b, torch.tensor([[1.0]]))  # (3 + 2*0) / 3
    assert torch.allclose(a, torch.tensor([[2.0, 2.0]]))  # (6 + 0)/3, (0 + 2*3)/3


def test_equal_weights_are_the_plain_mean_per_module():
    u1 = ClientUpdate({"x": (torch.ones(4, 2), torch.zeros(2, 3)),
                       "y": (torch.full((2, 2), 2.0), torch.ones(2, 2))}, 10)
    u2 = ClientUpdate({"x": (torch.zeros(4, 2), torch.ones(2, 3)),
                       "y": (torch.full((2, 2), 4.0), torch.ones(2, 2))}, 10)
    merged = fedavg([u1, u2])
    assert torch.equal(merged["x"][0], torch.full((4, 2), 0.5))
    assert torch.equal(merged["x"][1], torch.full((2, 3), 0.5))
    assert torch.equal(merged["y"][0], torch.full((2, 2), 3.0))


def test_fedavg_of_factors_is_not_the_average_of_products():
    u1, u2 = update([[1.0], [0.0]], [[1.0, 0.0]], 1), update([[0.0], [1.0]], [[0.0, 1.0]], 1)
    b, a = fedavg([u1, u2])["m"]
    exact = 0.5 * (u1.factors["m"][0] @ u1.factors["m"][1] + u2.factors["m"][0] @ u2.factors["m"][1])
    assert torch.allclose(exact, torch.eye(2) * 0.5)
    assert torch.allclose(b @ a, torch.full((2, 2), 0.25))  # mean(B) mean(A) != mean(BA)


def test_single_client_is_returned_unchanged():
    u = update([[1.5, -2.0]], [[0.25], [4.0]], 7)
    b, a = fedavg([u])["m"]
    assert torch.equal(b, u.factors["m"][0]) and torch.equal(a, u.factors["m"][1])


def test_different_ranks_are_refused_with_a_pointer_to_heterogeneous_strategies():
    u1 = ClientUpdate({"m": (torch.zeros(4, 2), torch.zeros(2, 3))}, 1)
    u2 = ClientUpdate({"m": (torch.zeros(4, 4), torch.zeros(4, 3))}, 1)
    with pytest.raises(ValueError, match="fedavg needs equal ranks"):
        fedavg([u1, u2])


def test_different_modules_are_refused():
    u1 = ClientUpdate({"m": (torch.zeros(2, 1), torch.zeros(1, 2))}, 1)
    u2 = ClientUpdate({"n": (torch.zeros(2, 1), torch.zeros(1, 2))}, 1)
    with pytest.raises(ValueError, match="other modules"):
        fedavg([u1, u2])


def test_non_positive_weight_is_refused():
    with pytest.raises(ValueError, match="weight must be > 0"):
        update([[1.0]], [[1.0]], 0)


def test_registry_finds_fedavg_and_names_known_strategies_on_a_miss():
    assert get_strategy("fedavg") is STRATEGIES["fedavg"]
    with pytest.raises(KeyError, match="known: fedavg"):
        get_strategy("nope")
