"""Expert Choice routing (`moe.router=expert_choice`): each expert picks its top-C tokens of each routing group."""

import json

import pytest
import torch

from limoe.checks import ConfigError
from limoe.moe import Dispatcher, MoeConfig, MoeMlp
from limoe.moe.reference import expert_choice_loop, moe_loop
from limoe.moe.routers.expert_choice import expert_choice
from limoe.moe.routing import capacity
from limoe.train.config import DistConfig

from _model_synth import filled_groups
from _train_utils import tiny_config


def make_layer(**overrides) -> MoeMlp:
    torch.manual_seed(0)
    # No router noise unless asked: the reference picks from the clean softmax.
    return MoeMlp(MoeConfig(**{"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": "expert_choice", "noise_std": 0,
                               **overrides}))


BACKENDS = ["bmm"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])
CASES = {  # name: (layer overrides, examples, tokens per example, padding)
    "one_group": (dict(), 5, 6, False),
    "groups_padding": (dict(group_size=2), 6, 5, True),
    "uneven_last_group": (dict(group_size=4, capacity_factor=2.0), 6, 3, True),
    "small_capacity": (dict(group_size=3, capacity_factor=0.5, capacity_multiple_of=1), 6, 4, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_reference_picks_outputs_and_gradients(case, backend):
    overrides, examples, tokens, padding = CASES[case]
    layer = make_layer(expert_backend=backend, **overrides).train()
    gen = torch.Generator().manual_seed(3)
    x_BNd = torch.randn(examples, tokens, 8, generator=gen, requires_grad=True)
    valid_BN = torch.rand(examples, tokens, generator=gen) > 0.3 if padding else None
    modality_BN = torch.randint(0, 2, (examples, tokens), generator=gen)
    y, aux = layer(x_BNd, modality_BN, valid_BN)

    # Reference: the groups the layer forms (padding examples filling the last one), Python loops for the picks
    # and the experts.
    group = overrides.get("group_size") or examples
    x_Sd, valid_S, num_groups = filled_groups(x_BNd, valid_BN, group)
    p_SE = torch.softmax(x_Sd @ layer.router.router_dE, dim=-1)
    ref = expert_choice_loop(p_SE, layer.capacity_for(group * tokens), valid_S, num_groups)
    num_tokens = examples * tokens
    got = aux.routing
    assert not got.ranked and got.k == 4 and got.capacity == ref.capacity
    assert torch.equal(got.kept_SK, ref.kept_SK[:num_tokens])
    assert torch.equal(got.slot_SK, ref.slot_SK[:num_tokens])
    torch.testing.assert_close(got.gate_SK, ref.gate_SK[:num_tokens])
    y_ref = moe_loop(layer.experts, x_Sd, ref)[:num_tokens].view_as(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)

    weights = torch.randn(y.shape, generator=gen)
    params = [x_BNd, layer.router.router_dE, *layer.experts.parameters()]
    grads = torch.autograd.grad((y * weights).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), params)
    for name, g, g_ref in zip(["x", "router", "w_in", "b_in", "w_out", "b_out"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_capacity_is_filled_exactly_and_never_exceeded(cf):
    layer = make_layer(group_size=2, capacity_factor=cf, eval_capacity_factor=cf * 2)
    x_BNd = torch.randn(8, 10, 8)
    valid_BN = torch.ones(8, 10, dtype=torch.bool)
    valid_BN[1, 3:] = False  # group 0: 13 valid tokens
    valid_BN[6:] = False  # group 3: none
    for training in (True, False):
        layer.train(training)
        _, aux = layer(x_BNd, valid=valid_BN)
        r = aux.routing
        assert r.capacity == capacity(20, 4, 1, cf * (1 if training else 2))
        valid_G = valid_BN.view(4, 20).sum(1)
        kept_GE = r.kept_SK.view(4, 20, 4).sum(1)
        assert torch.equal(kept_GE, torch.minimum(valid_G, torch.tensor(r.capacity))[:, None].expand(4, 4))
        # Kept slots of each expert and group are exactly 0 .. count - 1 (what the dispatcher's layouts assume).
        for g in range(4):
            for e in range(4):
                slots = sorted(r.slot_SK.view(4, 20, 4)[g, :, e][r.kept_SK.view(4, 20, 4)[g, :, e]].tolist())
                assert slots == list(range(int(kept_GE[g, e])))
        assert r.kept_SK.float().sum() == aux.stats.processed_ME.sum()


def test_capacity_from_valid_tokens_per_group():
    layer = make_layer(group_size=1, capacity_tokens="valid", capacity_multiple_of=1)
    valid_BN = torch.ones(2, 16, dtype=torch.bool)
    valid_BN[1, 4:] = False
    _, aux = layer(torch.randn(2, 16, 8), valid=valid_BN)
    assert aux.routing.kept_SK.view(2, 16, 4).sum(1).tolist() == [[4] * 4, [1] * 4]  # ceil(16/4), ceil(4/4)


def test_padding_is_never_picked_even_with_room_to_spare():
    layer = make_layer(capacity_factor=4.0)  # C = the group's 12 tokens: every valid token fits every expert
    valid_BN = torch.tensor([[True, False, True], [False, False, True], [True, True, False], [False] * 3])
    y, aux = layer(torch.randn(4, 3, 8), valid=valid_BN)
    valid_S = valid_BN.reshape(-1)
    assert torch.equal(aux.routing.kept_SK, valid_S[:, None].expand(12, 4))
    assert bool((aux.routing.slot_SK[~valid_S] == -1).all())
    assert bool((y.reshape(12, 8)[~valid_S] == 0).all())


def test_a_token_may_get_no_expert_or_several():
    # Expert e takes the one token with the largest p(e | token): token 0 for experts 0 and 1, token 2 for 2.
    p_SE = torch.tensor([[0.5, 0.45, 0.05], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    r = expert_choice(p_SE, capacity=1)
    assert r.kept_SK.tolist() == [[True, True, False], [False, False, False], [False, False, True]]
    layer = make_layer(num_experts=3, capacity_factor=1.0, capacity_multiple_of=1)
    x_Sd = torch.randn(3, 8)
    y_Sd = Dispatcher("bmm")(x_Sd, r, layer.experts)
    assert bool((y_Sd[1] == 0).all())
    torch.testing.assert_close(y_Sd, moe_loop(layer.experts, x_Sd, r))
    # Random tokens: some get none, some several; success = at least one expert.
    _, aux = make_layer()(torch.randn(64, 8))
    count_S = aux.routing.kept_SK.sum(1)
    assert int(count_S.min()) == 0 and int(count_S.max()) >= 2
    assert aux.stats.routing_success_M[0].item() == pytest.approx((count_S > 0).float().mean().item())
    assert aux.stats.dropped_fraction_M[0].item() == pytest.approx((count_S == 0).float().mean().item())
    assert torch.equal(aux.stats.routed_ME, aux.stats.processed_ME)  # an expert is asked for its picks only


def test_reports_z_and_entropy_losses_as_top_k_does():
    ec, tk = make_layer(group_size=2), make_layer(group_size=2, router="top_k", noise_std=0.0)
    tk.load_state_dict(ec.state_dict())
    x_BNd, modality_BN = torch.randn(4, 6, 8), torch.arange(24).view(4, 6) % 2
    _, aux_ec = ec(x_BNd, modality_BN)
    _, aux_tk = tk(x_BNd, modality_BN)
    assert tuple(aux_ec.losses) == ("z", "local_entropy/image", "global_entropy/image", "local_entropy/text",
                                    "global_entropy/text")
    for name, value in aux_ec.losses.items():
        torch.testing.assert_close(value, aux_tk.losses[name], msg=name)


def test_refusals_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="moe.k=2 has no meaning with moe.router='expert_choice'") as e:
        MoeConfig(dim=8, hidden_dim=16, num_experts=4, k=2, router="expert_choice")
    assert "\n" not in str(e.value)
    cfg = tiny_config(tmp_path)
    cfg.moe = {"router": "expert_choice", "k": 2}
    with pytest.raises(ConfigError, match="moe.k=2 has no meaning") as e:
        cfg.validate()
    assert "\n" not in str(e.value)
    cfg.moe = {"router": "expert_choice"}
    cfg.dist = DistConfig(expert_parallel=2)
    cfg.validate()  # expert parallelism exchanges its [E, C, d] buffers as top_k's (tests/parallel/test_train_fsdp.py)


def test_trains_end_to_end_and_evaluates(tmp_path):
    from limoe.jobs import evaluate_checkpoint
    from limoe.train import train

    cfg = tiny_config(tmp_path, steps=4)
    cfg.moe = {"router": "expert_choice"}
    result = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    last = [m for m in lines if m["kind"] == "train"][-1]
    assert "aux/z" in last and "aux/importance" not in last
    assert 0.0 < last["routing/routing_success/image"] <= 1.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["moe"]["router"] == "expert_choice"
    metrics = evaluate_checkpoint(str(tmp_path / "run"))
    assert 0.0 <= metrics["zero_shot/top1"] <= 1.0


def test_token_maps_show_the_heaviest_expert_that_picked_a_token():
    from limoe.analysis.routing_stats import map_choice

    # Three tokens, three experts (expert choice: one column per expert).
    expert_SK = torch.arange(3).expand(3, 3)
    kept_SK = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    gate_SK = torch.tensor([[0.7, 0.1, 0.2], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    expert_S, kept_S = map_choice(expert_SK, kept_SK, gate_SK, ranked=False)
    assert expert_S.tolist()[::2] == [2, 0] and kept_S.tolist() == [True, False, True]
    # Ranked (top-k) routing: column 0, the top choice, whether kept or not.
    expert_S, kept_S = map_choice(expert_SK, kept_SK, gate_SK, ranked=True)
    assert expert_S.tolist() == [0, 0, 0] and kept_S.tolist() == [False, False, True]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_equal_scores_pick_the_earliest_tokens(device):
    p_SE = torch.full((6, 2), 0.5, device=device)
    routing = expert_choice(p_SE, capacity=2, num_groups=2)  # groups of 3 tokens
    assert routing.kept_SK[:, 0].tolist() == [True, True, False, True, True, False]
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        quantised = (torch.rand(24, 4, generator=gen) * 4).round() / 4
        fast = expert_choice(quantised.to(device), 3, num_groups=2)
        slow = expert_choice_loop(quantised, 3, num_groups=2)
        assert torch.equal(fast.kept_SK.cpu(), slow.kept_SK) and torch.equal(fast.slot_SK.cpu(), slow.slot_SK)


def test_training_noise_picks_and_weighs_as_vmoe_eval_is_clean():
    # V-MoE's top-items-per-expert router: in training the softmax of noisy logits (std noise_std / E) both picks
    # the tokens and weighs their outputs; the losses read the clean softmax; evaluation has no noise.
    layer = make_layer(noise_std=1.0).train()
    x_Sd, modality_S = torch.randn(12, 8), torch.zeros(12, dtype=torch.long)
    torch.manual_seed(5)
    out = layer.router(x_Sd, modality_S)
    torch.manual_seed(5)
    clean_SE = x_Sd @ layer.router.router_dE.detach()
    noisy_SE = clean_SE + torch.randn_like(clean_SE) / 4  # std noise_std / E = 1 / 4, drawn as the router draws
    expected = expert_choice(torch.softmax(noisy_SE, -1), layer.capacity_for(12))
    assert torch.equal(out.routing.kept_SK, expected.kept_SK)
    torch.testing.assert_close(out.routing.gate_SK, torch.softmax(noisy_SE, -1))
    torch.testing.assert_close(out.entropy_S, torch.distributions.Categorical(logits=clean_SE).entropy())
    layer.eval()
    torch.testing.assert_close(layer.router(x_Sd, modality_S).routing.gate_SK, torch.softmax(clean_SE, -1))


def test_a_capacity_above_the_group_is_an_error_naming_the_values():
    # V-MoE's top_k over a group's items cannot pick more items than the group has.
    with pytest.raises(ConfigError, match=r"moe.capacity_factor=5.0 with moe.router='expert_choice'.*at most "
                                          r"moe.num_experts=4"):
        MoeConfig(dim=8, hidden_dim=16, num_experts=4, router="expert_choice", capacity_factor=5.0)
    with pytest.raises(ConfigError, match="moe.eval_capacity_factor=8"):
        MoeConfig(dim=8, hidden_dim=16, num_experts=4, router="expert_choice", eval_capacity_factor=8)
    layer = make_layer()  # 2 tokens, 4 experts: ceil(0.5) = 1 slot, rounded up to 4
    with pytest.raises(ValueError, match=r"capacity 4 \(capacity factor 1.0, 4 experts, ceil to a multiple of "
                                         r"moe.capacity_multiple_of=4\) exceeds the routing group's 2 tokens"):
        layer(torch.randn(1, 2, 8))
    make_layer(capacity_multiple_of=1)(torch.randn(1, 2, 8))  # 1 slot of 2 tokens: fine


def test_trains_without_aux_losses_unless_asked():
    from limoe.losses import LossConfig, compute_losses
    from limoe.model.base import ModelOutput

    layer = make_layer(group_size=2)
    _, aux = layer(torch.randn(4, 6, 8), torch.arange(24).view(4, 6) % 2)
    out = ModelOutput(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0), None, [aux])
    assert not [name for name in compute_losses(out, LossConfig()) if name.endswith("entropy_image_loss")]
    asked = compute_losses(out, LossConfig(local_entropy={"image": 0.5}))
    torch.testing.assert_close(asked["local_entropy_image_loss"], 0.5 * aux.losses["local_entropy/image"])
