"""Soft MoE (`moe.router=soft`): slots mix the tokens of a routing group, tokens mix the slots' outputs."""

import dataclasses
import json

import pytest
import torch

import limoe
from limoe.checkpoint.format import read_model_config
from limoe.checks import ConfigError
from limoe.losses import LossConfig
from limoe.moe import MoeConfig, MoeMlp
from limoe.moe.reference import soft_moe_loop
from limoe.moe.routing import SoftRouting, capacity
from limoe.train.config import DistConfig

from _model_synth import filled_groups
from _train_utils import tiny_config


def make_layer(**overrides) -> MoeMlp:
    torch.manual_seed(0)
    layer = MoeMlp(MoeConfig(**{"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": "soft",
                                "slots_per_expert": 2, **overrides}))
    with torch.no_grad():  # sharper than the init (scale 1), so that the softmaxes are far from uniform
        layer.router.router_scale.fill_(4.0)
    return layer


CASES = {  # name: (layer overrides, examples, tokens per example, padding)
    "one_group": (dict(), 5, 6, False),
    "groups_padding": (dict(group_size=2), 6, 5, True),
    "uneven_last_group": (dict(group_size=4, slots_per_expert=3), 6, 3, True),
    "group_size_1": (dict(group_size=1, slots_per_expert=1), 3, 4, True),
}


def _inputs(examples, tokens, padding, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x_BNd = torch.randn(examples, tokens, 8, generator=gen, requires_grad=True)
    valid_BN = torch.rand(examples, tokens, generator=gen) > 0.3 if padding else None
    modality_BN = torch.randint(0, 2, (examples, tokens), generator=gen)
    return x_BNd, modality_BN, valid_BN


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_reference_outputs_and_gradients(case):
    overrides, examples, tokens, padding = CASES[case]
    layer = make_layer(**overrides).train()
    x_BNd, modality_BN, valid_BN = _inputs(examples, tokens, padding)
    y, aux = layer(x_BNd, modality_BN, valid_BN)

    # Reference: the groups the layer forms (padding examples filling the last one), loops over groups and slots.
    x_Sd, valid_S, num_groups = filled_groups(x_BNd, valid_BN, overrides.get("group_size"))
    router = layer.router
    y_ref = soft_moe_loop(layer.experts, x_Sd, router.router_dN, router.router_scale, valid_S,
                          num_groups)[:examples * tokens].view_as(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert isinstance(aux.routing, SoftRouting) and aux.routing.capacity == router.slots_per_expert

    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    params = [x_BNd, router.router_dN, router.router_scale, *layer.experts.parameters()]
    grads = torch.autograd.grad((y * weights).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), params)
    for name, g, g_ref in zip(["x", "phi", "scale", "w_in", "b_in", "w_out", "b_out"], grads, grads_ref):
        assert g.abs().sum() > 0, name  # every parameter takes part
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=name)


def test_dispatch_sums_to_one_over_tokens_and_combine_over_slots():
    layer = make_layer(group_size=2)
    x_BNd, modality_BN, valid_BN = _inputs(6, 5, padding=True)
    valid_BN[4:] = False  # the last group has no valid token
    _, aux = layer(x_BNd, modality_BN, valid_BN)
    r = aux.routing
    dispatch_GmZ = r.dispatch_SZ.view(3, 10, 8)
    torch.testing.assert_close(dispatch_GmZ[:2].sum(1), torch.ones(2, 8))  # each slot: a convex mixture
    assert bool((dispatch_GmZ[2] == 0).all())
    valid_S = valid_BN.reshape(-1)
    torch.testing.assert_close(r.combine_SZ[valid_S].sum(1), torch.ones(int(valid_S.sum())))
    assert bool((r.combine_SZ[~valid_S] == 0).all()) and bool((r.dispatch_SZ[~valid_S] == 0).all())


def test_padding_is_never_mixed_in_and_gets_zero():
    layer = make_layer(group_size=2)
    x_BNd, modality_BN, valid_BN = _inputs(4, 5, padding=True)
    y, aux = layer(x_BNd, modality_BN, valid_BN)
    changed = torch.where(valid_BN[..., None], x_BNd, 100 * torch.randn_like(x_BNd))
    y2, aux2 = layer(changed, modality_BN, valid_BN)
    assert torch.equal(y, y2)
    assert bool((y[~valid_BN] == 0).all())
    for name in aux.losses:
        assert torch.equal(aux.losses[name], aux2.losses[name]), name


def test_a_group_of_padding_only_gives_zeros_not_nan():
    layer = make_layer(group_size=1)
    x_BNd = torch.randn(2, 4, 8, requires_grad=True)
    valid_BN = torch.tensor([[True, False, True, True], [False] * 4])
    y, aux = layer(x_BNd, valid=valid_BN)
    assert bool((y[1] == 0).all()) and bool(y.isfinite().all())
    assert all(bool(v.isfinite()) for v in aux.losses.values())
    (y.sum() + sum(aux.losses.values())).backward()
    assert bool(x_BNd.grad.isfinite().all()) and bool((x_BNd.grad[1] == 0).all())
    assert all(bool(p.grad.isfinite().all()) for p in layer.parameters())


def test_slots_mix_examples_within_a_group_and_only_there():
    x_BNd, modality_BN, _ = _inputs(4, 3, padding=False)
    other = x_BNd.detach().clone()
    other[1] += 1.0  # change example 1 only
    for group_size, leaks in ((2, True), (1, False)):
        layer = make_layer(group_size=group_size)
        y, _ = layer(x_BNd, modality_BN)
        y2, _ = layer(other, modality_BN)
        assert not torch.equal(y[0], y2[0]) if leaks else torch.equal(y[0], y2[0])  # example 0 shares its group
        assert torch.equal(y[2:], y2[2:])  # other groups never see example 1


def test_statistics_count_every_token_and_its_heaviest_expert():
    from limoe.analysis.routing_stats import map_choice

    layer = make_layer(group_size=2)
    x_BNd, modality_BN, valid_BN = _inputs(4, 5, padding=True)
    _, aux = layer(x_BNd, modality_BN, valid_BN)
    r, valid_S = aux.routing, valid_BN.reshape(-1)
    q_SE = r.combine_SZ.view(-1, 4, 2).sum(-1)
    assert torch.equal(r.expert_SK[valid_S, 0], q_SE[valid_S].argmax(1))
    torch.testing.assert_close(r.gate_SK[valid_S, 0], q_SE[valid_S].max(1).values)
    assert aux.stats.routing_success_M.tolist() == [1.0, 1.0] and aux.stats.dropped_M.sum() == 0
    assert aux.stats.processed_ME.sum() == valid_S.sum()
    expert_S, kept_S = map_choice(r.expert_SK, r.kept_SK, r.gate_SK, r.ranked)
    assert torch.equal(expert_S[valid_S], q_SE[valid_S].argmax(1)) and torch.equal(kept_S, valid_S)


def test_losses_are_z_and_entropies_of_the_summed_combine_weights():
    layer = make_layer(group_size=2)
    x_BNd, modality_BN, _ = _inputs(4, 6, padding=False)
    _, aux = layer(x_BNd, modality_BN)
    assert tuple(aux.losses) == ("z", "local_entropy/image", "global_entropy/image", "local_entropy/text",
                                 "global_entropy/text")
    assert all(LossConfig().weight(name) >= 0 for name in aux.losses)
    q_SE = aux.routing.combine_SZ.view(-1, 4, 2).sum(-1)
    image_S = modality_BN.reshape(-1) == 0
    entropy_S = -(q_SE * q_SE.log()).sum(-1)
    # The local entropy is the mean over each group's image tokens, averaged over the two groups.
    want = torch.stack([entropy_S[g * 12:(g + 1) * 12][image_S[g * 12:(g + 1) * 12]].mean() for g in (0, 1)]).mean()
    torch.testing.assert_close(aux.losses["local_entropy/image"], want)


def test_logits_stay_float32_under_autocast():
    layer = make_layer()
    x_Sd = torch.randn(12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router.logits(x_Sd)
        y, _ = layer(x_Sd)
    assert logits.dtype == torch.float32 and bool(y.isfinite().all())


def test_slots_default_to_the_top1_capacity_of_a_training_group(tmp_path):
    from limoe.model.registry import get_config

    # The paper's defaults (V-MoE's soft_moe): one group per example and modality (16 patches, or 16 text
    # positions), slots = round(16 * 1.0 / 8) = 2 per expert, over the preset's joint groups of 8 pairs.
    paper = get_config("limoe-tiny", router="soft").moe_config()
    assert (paper.group_size, paper.routing_groups, paper.slots_per_expert) == (1, "per_modality", 2)
    assert get_config("limoe-tiny", router="soft", num_experts=5).moe_config().slots_per_expert == 3  # round(3.2)
    # LIMoE's joint groups, V-MoE's router rounding (ceil, multiple of 4): the (h) comparison of limoe reproduce.
    base = get_config("limoe-tiny")
    joint = get_config("limoe-tiny", router="soft", group_size=8, routing_groups="joint", capacity_rounding="ceil",
                       capacity_multiple_of=4).moe_config()
    tokens = 8 * (base.num_patches + base.context_length)  # a group of 8 pairs: 16 patches + 16 positions each
    assert joint.num_experts == 8 and joint.slots_per_expert == capacity(tokens, 8, 1, 1.0) == 32  # 256 / 8
    split = get_config("limoe-tiny", router="soft", group_size=8, capacity_rounding="ceil").moe_config()
    assert split.slots_per_expert == capacity(8 * 16, 8, 1, 1.0) == 16
    assert get_config("limoe-tiny", router="soft", slots_per_expert=5).moe_config().slots_per_expert == 5
    # A checkpoint's config is the merged dict: one saved before these defaults builds the model it saved, the
    # preset's eval_capacity_factor (which Soft MoE never read) dropped as it is read.
    (tmp_path / "model.json").write_text(json.dumps(dataclasses.asdict(
        dataclasses.replace(base, moe={**base.moe, "router": "soft"}))))
    saved = read_model_config(tmp_path)
    assert saved.moe_config().slots_per_expert == 32 and saved.moe_config().routing_groups == "joint"
    assert "eval_capacity_factor" not in saved.moe


def test_refusals_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="moe.k=2 has no meaning with moe.router='soft'") as e:
        MoeConfig(dim=8, hidden_dim=16, num_experts=4, k=2, router="soft", slots_per_expert=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs moe.slots_per_expert"):
        MoeConfig(dim=8, hidden_dim=16, router="soft")
    cfg = tiny_config(tmp_path)
    cfg.moe = {"router": "soft", "group_size": None}
    with pytest.raises(ConfigError, match="needs moe.slots_per_expert") as e:
        cfg.validate()
    assert "\n" not in str(e.value)
    cfg.moe = {"router": "soft"}
    cfg.dist = DistConfig(expert_parallel=2)
    cfg.validate()  # expert parallelism exchanges the slots' [E, G*p, d] buffers (tests/parallel/test_train_fsdp.py)


def test_state_dict_keys_sit_at_the_layer():
    layer, other = make_layer(), make_layer(slots_per_expert=2)
    assert list(layer.state_dict())[:2] == ["router_dN", "router_scale"]
    with torch.no_grad():
        other.router.router_dN.add_(1.0)
        other.router.router_scale.fill_(7.0)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.router.router_dN, layer.router.router_dN) and other.router.router_scale.item() == 4.0


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    """A soft run trained 2 steps, stopped and resumed for 2 more."""
    from limoe.train import train

    tmp = tmp_path_factory.mktemp("soft")
    cfg = tiny_config(tmp, steps=4, checkpoint_interval=0)
    cfg.moe = {"router": "soft"}
    first = train(cfg, stop_after=2, progress=False)
    second = train(cfg, resume="latest", progress=False)
    return tmp, cfg, first, second


def test_trains_resumes_and_evaluates(soft_run):
    from limoe.jobs import evaluate_checkpoint

    tmp, _, first, second = soft_run
    assert first.step == 2 and second.step == 4
    assert all(torch.isfinite(torch.tensor(loss)) for loss in first.losses + second.losses)
    lines = [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl")]
    last = [m for m in lines if m["kind"] == "train"][-1]
    assert "aux/z" in last and "aux/local_entropy/text" in last and "aux/importance" not in last
    assert "local_entropy_text_loss" not in last  # reported, but weighed 0: V-MoE trains Soft MoE without aux losses
    assert last["routing/routing_success/image"] == 1.0 and last["routing/routing_success/text"] == 1.0
    assert json.loads((tmp / "run" / "config.json").read_text())["moe"]["router"] == "soft"
    model, _, _ = limoe.load_checkpoint(str(tmp / "run"))
    router = model.encoder.blocks[1].mlp.router
    assert router.slots_per_expert == 2 and router.router_scale.item() != 1.0  # trained, saved and loaded
    metrics = evaluate_checkpoint(str(tmp / "run"))
    assert 0.0 <= metrics["zero_shot/top1"] <= 1.0


def test_analyze_runs_on_a_soft_run(soft_run, tmp_path):
    from limoe.cli import main
    from limoe.data.builtin import dataset_dir
    from limoe.train.data import builtin_config

    tmp, cfg, _, _ = soft_run
    pairs = dataset_dir(builtin_config(cfg)) / "test.csv"
    out = tmp_path / "report"
    assert main(["analyze", str(tmp / "run"), "--data", str(pairs), "--num-pairs", "8", "--batch-size", "8",
                 "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["has_moe"] and data["num_pairs"] == 8
    for layer in data["layers"]:
        assert layer["modality"]["image"]["tokens"] > 0 and layer["modality"]["text"]["tokens"] > 0


def test_slot_init_and_normalisation_follow_vmoe():
    from limoe.moe.routers.soft import l2_normalize

    def phi_std(**overrides):
        torch.manual_seed(0)
        config = MoeConfig(dim=256, hidden_dim=8, num_experts=8, router="soft", slots_per_expert=16, **overrides)
        return MoeMlp(config).router.router_dN.std().item()

    # V-MoE's lecun_normal over a (d, E, p) kernel: fan_in = d * E; "unit_columns": fan_in = d.
    assert phi_std() == pytest.approx((256 * 8) ** -0.5, rel=0.03)
    assert phi_std(soft_init="unit_columns") == pytest.approx(256 ** -0.5, rel=0.03)
    # V-MoE's epsilon sits inside the square root: a short vector is not blown up to unit length.
    v = torch.tensor([[3e-4, 4e-4]])  # |v| = 5e-4, |v|^2 = 2.5e-7
    torch.testing.assert_close(l2_normalize(v, dim=-1), v / (2.5e-7 + 1e-6) ** 0.5)
    torch.testing.assert_close(l2_normalize(torch.tensor([[3.0, 4.0]]), dim=-1), torch.tensor([[0.6, 0.8]]))
