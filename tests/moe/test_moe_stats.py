"""Routing statistics against hand-counted values."""

import math

import torch

from limoe.moe import MoeConfig, MoeMlp, MoeStats

MODALITIES = ("image", "text")


def hand_stats():
    # Tokens: two images, two texts, one padding. Experts: 2. Top-1 choices and whether they were kept:
    #   img0 -> e0 kept, img1 -> e1 dropped, txt0 -> e1 kept, txt1 -> e0 kept, pad -> e1 (ignored)
    onehot_SM = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 0]])
    expert_SK = torch.tensor([[0], [1], [1], [0], [1]])
    kept_SK = torch.tensor([[True], [False], [True], [True], [False]])
    entropy_S = torch.tensor([0.1, 0.3, 0.5, 0.7, 9.0])
    return MoeStats.compute(MODALITIES, onehot_SM, expert_SK, kept_SK, entropy_S, num_experts=2)


def test_counts_and_rates_match_hand_counts():
    s = hand_stats()
    assert s.tokens_M.tolist() == [2, 2]
    assert s.routing_success_M.tolist() == [0.5, 1.0]
    assert s.dropped_fraction_M.tolist() == [0.5, 0.0]
    assert torch.allclose(s.mean_entropy_M, torch.tensor([0.2, 0.6]))
    assert s.routed_ME.tolist() == [[1, 1], [1, 1]]
    assert s.processed_ME.tolist() == [[1, 0], [1, 1]]
    assert s.share_of("image").tolist() == [0.5, 0.0]  # expert 1 only processed text
    assert torch.allclose(s.expert_load_E, torch.tensor([2 / 3, 1 / 3]))


def test_token_rescued_by_its_second_choice_is_not_dropped():
    # One image token: first choice e0 dropped, second choice e1 kept.
    s = MoeStats.compute(MODALITIES, torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]),
                         torch.tensor([[False, True]]), torch.tensor([0.0]), num_experts=2)
    assert s.routing_success_M[0].item() == 0.0
    assert s.dropped_M[0].item() == 0.0
    assert s.routed_ME[0].tolist() == [1, 1] and s.processed_ME[0].tolist() == [0, 1]


def test_stats_add_up_over_batches():
    total = hand_stats() + hand_stats()
    assert total.tokens_M.tolist() == [4, 4]
    assert total.routing_success_M.tolist() == [0.5, 1.0]
    summary = total.summary(prefix="layer1/")
    assert summary["layer1/routing_success/image"] == 0.5
    assert summary["layer1/dropped_fraction/text"] == 0.0


def test_absent_modality_is_left_out_of_summary():
    s = MoeStats.compute(MODALITIES, torch.tensor([[1.0, 0.0]]), torch.tensor([[0]]), torch.tensor([[True]]),
                         torch.tensor([0.0]), num_experts=2)
    assert math.isnan(s.routing_success_M[1].item())
    assert "routing_success/text" not in s.summary() and s.summary()["routing_success/image"] == 1.0


def test_layer_stats_agree_with_its_routing():
    torch.manual_seed(0)
    layer = MoeMlp(MoeConfig(dim=8, hidden_dim=8, num_experts=4, k=2, capacity_factor=0.5)).eval()
    with torch.no_grad():
        layer.router.router_dE.normal_(0, 1.0)  # skewed routing: popular experts overflow, others have room
    modality_S = torch.arange(40) % 3 == 0  # a third text tokens
    valid_S = torch.arange(40) < 36
    _, aux = layer(torch.randn(40, 8), modality=modality_S.long(), valid=valid_S)
    r, s = aux.routing, aux.stats
    for m, mask in enumerate([~modality_S & valid_S, modality_S & valid_S]):
        assert s.tokens_M[m].item() == mask.sum().item()
        assert s.top1_kept_M[m].item() == r.kept_SK[mask, 0].sum().item()
        assert s.dropped_M[m].item() == (~r.kept_SK[mask].any(1)).sum().item()
        for e in range(4):
            assert s.processed_ME[m, e].item() == (r.kept_SK[mask] & (r.expert_SK[mask] == e)).sum().item()
