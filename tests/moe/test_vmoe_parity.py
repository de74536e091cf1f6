"""Golden cases from V-MoE's own tests (google-research/vmoe: moe_test.py, nn/routing_test.py,
projects/soft_moe/router_test.py): their inputs and expected values, as numbers; the test code is ours.
docs/routing.md's parity table says which setting of ours matches each of V-MoE's."""

import pytest
import torch

from limoe.moe import MoeConfig, MoeMlp
from limoe.moe import aux_losses
from limoe.moe.routers.expert_choice import expert_choice
from limoe.moe.routing import Routing, capacity, route

# moe_test.py's scenario: three items of one group, three experts, capacity 2.
GATES = torch.tensor([[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]])


def combine_SEC(routing: Routing) -> torch.Tensor:
    """V-MoE's combine weights [S, E, C]: the gate where item s sits in slot c of expert e, else 0."""
    out = torch.zeros(routing.expert_SK.shape[0], routing.num_experts, routing.capacity)
    for s, k in routing.kept_SK.nonzero().tolist():
        out[s, routing.expert_SK[s, k], routing.slot_SK[s, k]] = routing.gate_SK[s, k]
    return out


@pytest.mark.parametrize("batch_priority, expected", [
    (False, [[[.4, .0], [.0, .0], [.0, .2]],
             [[.0, .5], [.0, .0], [.0, .0]],
             [[.0, .0], [.0, .0], [.6, .0]]]),
    (True, [[[.0, .4], [.0, .0], [.0, .0]],
            [[.5, .0], [.0, .0], [.0, .4]],
            [[.0, .0], [.0, .0], [.6, .0]]]),
])
def test_top_experts_per_item_einsum_dispatcher(batch_priority, expected):
    routing = route(GATES, k=2, capacity=2, batch_priority=batch_priority)
    torch.testing.assert_close(combine_SEC(routing), torch.tensor(expected))


@pytest.mark.parametrize("batch_priority, expected", [
    (False, [[(0, 0), (2, 1)], [(0, 1), (2, 2)], [(2, 0), (0, 2)]]),
    (True, [[(0, 1), (2, 2)], [(0, 0), (2, 1)], [(2, 0), (0, 2)]]),
])
def test_top_experts_per_item_expert_indices(batch_priority, expected):
    # V-MoE's indices dispatcher: (expert, slot) of each item's k choices, slot >= capacity where dropped.
    routing = route(GATES, k=2, capacity=2, batch_priority=batch_priority)
    got = torch.stack([routing.expert_SK, routing.slot_SK], dim=-1)
    assert got.tolist() == [[list(pair) for pair in item] for item in expected]
    torch.testing.assert_close(routing.gate_SK, torch.tensor([[.4, .2], [.5, .4], [.6, .3]]))


def test_top_items_per_expert_einsum_dispatcher():
    # Expert 0 takes items (1, 0), experts 1 and 2 take items (2, 1).
    routing = expert_choice(GATES, capacity=2)
    dispatch = torch.tensor([[[0, 1], [0, 0], [0, 0]],
                             [[1, 0], [0, 1], [0, 1]],
                             [[0, 0], [1, 0], [1, 0]]], dtype=torch.float32)
    combine = torch.tensor([[[.0, .4], [.0, .0], [.0, .0]],
                            [[.5, .0], [.0, .1], [.0, .4]],
                            [[.0, .0], [.2, .0], [.6, .0]]])
    torch.testing.assert_close(combine_SEC(routing), combine)
    torch.testing.assert_close((combine_SEC(routing) > 0).float(), dispatch)


def test_capacity_as_compute_capacity():
    assert capacity(32, 32, 2, 1.0) == 4  # top experts per item: ceil(32 * 2 / 32) = 2, up to a multiple of 4
    assert capacity(128, 32, 1, 2.0) == 8  # top items per expert: 128 * 2 / 32
    assert capacity(8, 5, 1, 1.0, multiple_of=1, rounding="round") == 2  # Soft MoE: 8 tokens, 5 experts -> mu (16, 5, 2)
    # The examples: a B/16 group of 196 patches and an S/32 one of 49 over 8 experts.
    assert (capacity(196, 8, 1, 1.0, 1, "round"), capacity(196, 8, 1, 1.0)) == (24, 28)  # 24.5: halves to even
    assert (capacity(49, 8, 1, 1.0, 1, "round"), capacity(49, 8, 1, 1.0)) == (6, 8)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        capacity(128, 32, 1, -1.0)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        capacity(4, 32, 1, 1.0, rounding="round")  # 0.125 rounds to 0


def test_importance_loss():
    # sum of gates per expert [1.7, 1.1, 1.2]: (std / mean)^2 = 0.03874999
    gates = torch.tensor([[.5, .4, .1], [.3, .3, .4], [.1, .2, .7], [.8, .2, .0]])
    assert aux_losses.importance_loss(gates, torch.ones(4)).item() == pytest.approx(0.03874999, abs=1e-6)


def test_load_loss():
    # Three items, three experts, k = 2, noise std 0.1: a clear winner (expert 0) is selected whp.
    logits = torch.tensor([[.9, .06, .04], [.7, .18, .12], [.85, .05, .1]])
    noise = torch.tensor([[-.037, .026, -.018], [-.074, .045, -.015], [-.067, -.059, .073]])
    got = aux_losses.load_loss(logits, logits + noise, noise_std=0.1, k=2, w_S=torch.ones(3))
    assert got.item() == pytest.approx(0.48573864536489236, abs=1e-6)


@pytest.mark.parametrize("router", ["top_k", "expert_choice"])
def test_evaluation_is_deterministic_training_is_not(router):
    # routing_test.py: the same input under two noise seeds routes alike in evaluation, differently in training.
    torch.manual_seed(0)
    layer = MoeMlp(MoeConfig(dim=4, hidden_dim=8, num_experts=4, k=2 if router == "top_k" else 1,
                             noise_std=2.0, router=router))
    with torch.no_grad():
        layer.router.router_dE.copy_(torch.eye(4))
    x_Sd = torch.arange(20.0).view(5, 4) / 20
    modality_S = torch.zeros(5, dtype=torch.long)

    def gates(seed, train):
        layer.train(train)
        torch.manual_seed(seed)
        return layer.router(x_Sd, modality_S).routing.gate_SK

    torch.testing.assert_close(gates(0, False), gates(1, False))
    assert (gates(0, True) - gates(1, True)).abs().sum() > 0.01
