"""Aux losses: hand-computed values, an independent scalar implementation, per-modality isolation, gradients."""

import math

import pytest
import torch

from limoe.moe import MoeConfig, MoeMlp, aux_losses

LN2 = math.log(2.0)


def test_importance_golden():
    # One token with p = [.75, .25]: Imp = [.75, .25], mean .5, population std .25 -> (0.5)^2.
    assert aux_losses.importance_loss(torch.tensor([[0.75, 0.25]]), torch.ones(1)).item() == pytest.approx(0.25)
    # Two mirrored tokens balance exactly.
    mirrored = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    assert aux_losses.importance_loss(mirrored, torch.ones(2)).item() == pytest.approx(0.0, abs=1e-7)
    # Weight 0 removes a token: only the first one counts.
    assert aux_losses.importance_loss(mirrored, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.25)


def _load_loss_scalar(logits, noisy, sigma, k):
    """The V-MoE load loss written with Python floats and math.erf."""
    num_tokens, num_experts = len(logits), len(logits[0])
    load = [0.0] * num_experts
    for s in range(num_tokens):
        threshold = sorted(noisy[s], reverse=True)[k - 1]
        for e in range(num_experts):
            z = (threshold - logits[s][e]) / sigma
            load[e] += (1.0 - 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))) / num_tokens
    mean = sum(load) / num_experts
    var = sum((v - mean) ** 2 for v in load) / num_experts
    return var / mean**2


@pytest.mark.parametrize("k", [1, 2])
def test_load_matches_scalar_formula(k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    noisy = logits + 0.25 * torch.randn(7, 4, generator=gen, dtype=torch.float64)
    got = aux_losses.load_loss(logits, noisy, 0.25, k, torch.ones(7, dtype=torch.float64)).item()
    assert got == pytest.approx(_load_loss_scalar(logits.tolist(), noisy.tolist(), 0.25, k), rel=1e-9)


def test_local_entropy_golden():
    entropy_S = aux_losses.entropy(torch.tensor([[0.0, 0.0], [0.0, -100.0]]))  # ln 2 and ~0
    assert entropy_S.tolist() == pytest.approx([LN2, 0.0], abs=1e-6)
    # Column 0: both tokens; column 1: only the first.
    w_SM = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert aux_losses.local_entropy_loss(entropy_S, w_SM).tolist() == pytest.approx([LN2 / 2, LN2])


def test_global_entropy_golden_and_threshold():
    # Tokens 0 and 1 both on expert 0, token 2 on expert 1. Modality columns: {0, 1}, {0, 2}, {} (empty).
    p_SE = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    w_SM = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    loss = aux_losses.global_entropy_loss(p_SE, w_SM, min_experts_M=torch.tensor([2.0, 2.0, 2.0]))
    # Collapsed: marginal entropy 0 -> ln 2; split evenly: ln 2 - ln 2 = 0; empty: 0, not ln 2.
    assert loss.tolist() == pytest.approx([LN2, 0.0, 0.0], abs=1e-6)
    # The threshold is a soft minimum: asking for one expert never penalises collapse.
    assert aux_losses.global_entropy_loss(p_SE, w_SM, torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]


def test_z_loss_golden():
    assert aux_losses.z_loss(torch.zeros(3, 2), torch.ones(3)).item() == pytest.approx(LN2**2)


def test_layer_losses_match_formulas_on_its_own_logits():
    torch.manual_seed(0)
    layer = MoeMlp(MoeConfig(dim=6, hidden_dim=8, num_experts=4, global_entropy_min_experts=(4, 2))).eval()
    with torch.no_grad():
        layer.router.router_dE.normal_(0, 3.0)  # confident routing: text marginal entropy below log 2
    x_Sd = torch.randn(10, 6)
    x_Sd[6:] = x_Sd[6] + 0.3 * torch.randn(4, 6)  # similar text tokens: they crowd onto few experts
    modality_S = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    _, aux = layer(x_Sd, modality=modality_S)
    p_SE = torch.softmax(x_Sd @ layer.router.router_dE, -1).detach()
    text = p_SE[6:]
    h_text = -(text * text.log()).sum(-1).mean()
    marginal = text.mean(0)
    want_global = max(0.0, math.log(2) + float((marginal * marginal.log()).sum()))
    assert aux.losses["local_entropy/text"].item() == pytest.approx(h_text.item(), rel=1e-5)
    assert want_global > 0.01
    assert aux.losses["global_entropy/text"].item() == pytest.approx(want_global, rel=1e-5)
    imp = p_SE.sum(0)
    assert aux.losses["importance"].item() == pytest.approx((imp.var(correction=0) / imp.mean() ** 2).item(), rel=1e-4)


def test_per_modality_losses_only_see_their_own_tokens():
    torch.manual_seed(0)
    # Thresholds of all 4 experts: the global losses are then never clipped to 0, so their gradients show.
    layer = MoeMlp(MoeConfig(dim=6, hidden_dim=8, num_experts=4, global_entropy_min_experts=(4, 4))).eval()
    x_Sd = torch.randn(12, 6, requires_grad=True)
    modality_S = torch.tensor([0] * 8 + [1] * 4)
    _, aux = layer(x_Sd, modality=modality_S)
    for name in ("local_entropy/text", "global_entropy/text"):
        (grad_x,) = torch.autograd.grad(aux.losses[name], x_Sd, retain_graph=True)
        assert bool((grad_x[:8] == 0).all()), name  # image tokens do not touch text losses
        assert bool((grad_x[8:] != 0).any()), name
    # Changing image tokens leaves the text losses unchanged.
    x_other = x_Sd.detach().clone()
    x_other[:8] = torch.randn(8, 6)
    _, aux_other = layer(x_other, modality=modality_S)
    for name in ("local_entropy/text", "global_entropy/text"):
        torch.testing.assert_close(aux.losses[name], aux_other.losses[name])
    assert not torch.allclose(aux.losses["local_entropy/image"], aux_other.losses["local_entropy/image"])


def test_every_loss_is_differentiable_in_training():
    torch.manual_seed(0)
    layer = MoeMlp(MoeConfig(dim=6, hidden_dim=8, num_experts=4, global_entropy_min_experts=(4, 4))).train()
    with torch.no_grad():
        layer.router.router_dE.normal_(0, 2.0)  # skewed routing so that no loss sits at its zero floor
    _, aux = layer(torch.randn(32, 6), modality=torch.arange(32) % 2)
    assert set(aux.losses) == {"importance", "load", "z", "local_entropy/image", "global_entropy/image",
                               "local_entropy/text", "global_entropy/text"}
    for name, value in aux.losses.items():
        assert value.dim() == 0 and bool(torch.isfinite(value)), name
        (grad,) = torch.autograd.grad(value, layer.router.router_dE, retain_graph=True)
        assert bool(grad.abs().sum() > 0), name


def test_single_modality_pass_has_finite_gradients():
    # LIMoE encodes images and texts in separate passes: the absent modality's losses must be 0 with finite
    # gradients (an entropy of an all-zero marginal is the classic 0 * log 0 NaN).
    torch.manual_seed(0)
    layer = MoeMlp(MoeConfig(dim=6, hidden_dim=8, num_experts=4)).train()
    x_Sd = torch.randn(16, 6, requires_grad=True)
    _, aux = layer(x_Sd, modality=1)
    assert aux.losses["local_entropy/image"].item() == 0.0 and aux.losses["global_entropy/image"].item() == 0.0
    sum(aux.losses.values()).backward()
    for name, p in [("x", x_Sd), *layer.named_parameters()]:
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
    assert bool(torch.isfinite(layer.router.router_dE.grad).all())


def _entropy_scalar(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def _cv2_scalar(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / mean**2


def _grouped_losses_scalar(logits, noisy, modality, valid, num_groups, min_experts, sigma, k):
    """Every aux loss written with Python floats: each on each group alone, then the mean over the groups that
    have tokens (of that modality)."""
    per_group, num_experts = len(logits) // num_groups, len(logits[0])
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    per_loss = {"importance": [], "load": [], "z": []}
    for m, name in enumerate(("image", "text")):
        per_loss[f"local_entropy/{name}"], per_loss[f"global_entropy/{name}"] = [], []
    for g in range(num_groups):
        tokens = [s for s in range(g * per_group, (g + 1) * per_group) if valid[s]]
        if not tokens:
            continue
        per_loss["importance"].append(_cv2_scalar([sum(p[s][e] for s in tokens) for e in range(num_experts)]))
        load = [0.0] * num_experts
        for s in tokens:
            threshold = sorted(noisy[s], reverse=True)[k - 1]
            for e in range(num_experts):
                z = (threshold - logits[s][e]) / sigma
                load[e] += (1.0 - 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))) / len(tokens)
        per_loss["load"].append(_cv2_scalar(load))
        per_loss["z"].append(sum(math.log(sum(math.exp(v) for v in logits[s])) ** 2 for s in tokens) / len(tokens))
        for m, name in enumerate(("image", "text")):
            mine = [s for s in tokens if modality[s] == m]
            if mine:
                per_loss[f"local_entropy/{name}"].append(sum(_entropy_scalar(p[s]) for s in mine) / len(mine))
                marginal = [sum(p[s][e] for s in mine) / len(mine) for e in range(num_experts)]
                per_loss[f"global_entropy/{name}"].append(max(0.0, math.log(min_experts[m])
                                                              - _entropy_scalar(marginal)))
    return {name: sum(values) / len(values) if values else 0.0 for name, values in per_loss.items()}


def test_losses_in_mixed_groups_match_a_scalar_implementation():
    # Three joint groups of two examples (8 image tokens + 4 text positions each, some text padding); the last
    # example's text is all padding and group 2 holds no text token at all.
    torch.manual_seed(0)
    cfg = MoeConfig(dim=6, hidden_dim=8, num_experts=4, k=2, group_size=2, global_entropy_min_experts=(3, 2))
    layer = MoeMlp(cfg).train()
    torch.manual_seed(1)  # the data below does not depend on how many numbers the layer's init drew
    with torch.no_grad():
        layer.router.router_dE.normal_(0, 2.0)
    x_BNd = torch.randn(6, 12, 6)
    x_BNd[:, 8:] = x_BNd[0, 8] + 0.2 * torch.randn(6, 4, 6)  # similar text tokens crowd onto few experts
    modality_BN = torch.tensor([0] * 8 + [1] * 4).repeat(6, 1)
    valid_BN = torch.ones(6, 12, dtype=torch.bool)
    valid_BN[:, 10:] = False
    valid_BN[4:, 8:] = False
    torch.manual_seed(5)
    _, aux = layer(x_BNd, modality=modality_BN, valid=valid_BN)
    torch.manual_seed(5)
    sigma = cfg.noise_std / cfg.num_experts
    logits_SE = (x_BNd.reshape(-1, 6) @ layer.router.router_dE).detach()  # float32, as the layer computes them
    noisy_SE = logits_SE + sigma * torch.randn_like(logits_SE)  # the layer's own noise draw
    want = _grouped_losses_scalar(logits_SE.tolist(), noisy_SE.tolist(), modality_BN.reshape(-1).tolist(),
                                  valid_BN.reshape(-1).tolist(), 3, (3, 2), sigma, 2)
    assert set(want) == set(aux.losses)
    for name, value in want.items():
        assert aux.losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert want["global_entropy/text"] > 0  # the threshold binds somewhere, so the check means something


def test_default_threshold_is_half_the_experts_and_binds_only_below_it():
    assert MoeConfig(dim=6, hidden_dim=8, num_experts=8).min_experts_per_modality == (4.0, 4.0)
    assert MoeConfig(dim=6, hidden_dim=8, num_experts=1).min_experts_per_modality == (1.0, 1.0)
    layer = MoeMlp(MoeConfig(dim=6, hidden_dim=8, num_experts=8)).eval()
    with torch.no_grad():
        layer.router.router_dE.zero_()
        layer.router.router_dE[0, :2] = 8.0  # tokens with x[0] = 1 split between experts 0 and 1 only
    x_Sd = torch.zeros(16, 6)
    x_Sd[8:, 0] = 1.0
    modality_S = torch.tensor([0] * 8 + [1] * 8)
    _, aux = layer(x_Sd, modality=modality_S)
    # Images route uniformly over 8 experts (entropy log 8 >= log 4): no loss. Text uses about 2 experts:
    # max(0, log 4 - H) with H about log 2.
    assert aux.losses["global_entropy/image"].item() == 0.0
    assert aux.losses["global_entropy/text"].item() == pytest.approx(math.log(2), abs=0.01)
