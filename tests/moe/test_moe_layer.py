"""MoeMlp against slow references, its invariants, modes, dtypes and argument checks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from limoe.moe import MoeConfig, MoeMlp
from limoe.moe.layer import set_eval_capacity_factor
from limoe.moe.reference import moe_loop, moe_onehot_einsum, route_loop


def make_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(dim=12, hidden_dim=20, num_experts=4, k=1, capacity_factor=1.0)
    cfg.update(overrides)
    layer = MoeMlp(MoeConfig(**cfg))
    with torch.no_grad():  # a sharper router than the default init, so gates differ visibly between experts
        if cfg.get("router") == "soft":  # normalised logits: the scale sharpens them
            layer.router.router_scale.fill_(4.0)
        else:
            layer.router.router_dE.normal_(0, 1.0)
    return layer


def reference_forward(layer, x_Sd):
    """Independent pipeline: router softmax -> Python-loop routing -> Python loop over experts."""
    cfg = layer.config
    gates_SE = torch.softmax(x_Sd @ layer.router.router_dE, dim=-1)
    cap = layer.capacity_for(x_Sd.shape[0])
    return moe_loop(layer.experts, x_Sd, route_loop(gates_SE, cfg.k, cap, cfg.batch_priority))


@pytest.mark.parametrize("k", [1, 2])
def test_equals_loop_reference_when_nothing_drops(k):
    layer = make_layer(k=k, capacity_factor=4.0 / k).eval()  # capacity = all tokens: nothing can drop
    x_Sd = torch.randn(40, 12, requires_grad=True)
    y_Sd, aux = layer(x_Sd)
    assert bool(aux.routing.kept_SK.all())
    x_ref = x_Sd.detach().clone().requires_grad_(True)
    y_ref = reference_forward(layer, x_ref)
    torch.testing.assert_close(y_Sd, y_ref, rtol=1e-5, atol=1e-6)

    grad_out = torch.randn_like(y_Sd)
    params = [x_Sd, *layer.parameters()]
    got = torch.autograd.grad(y_Sd, params, grad_out)
    want = torch.autograd.grad(y_ref, [x_ref, *layer.parameters()], grad_out)
    for name, g, w in zip(["x", *[n for n, _ in layer.named_parameters()]], got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("k, bpr", [(1, False), (1, True), (2, False), (2, True)])
def test_equals_loop_and_einsum_references_with_drops(k, bpr):
    layer = make_layer(k=k, capacity_factor=0.5, batch_priority=bpr).eval()
    x_Sd = torch.randn(64, 12)
    y_Sd, aux = layer(x_Sd)
    assert not bool(aux.routing.kept_SK.all())  # capacity binds
    torch.testing.assert_close(y_Sd, reference_forward(layer, x_Sd), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_Sd, moe_onehot_einsum(layer.experts, x_Sd, aux.routing), rtol=1e-5, atol=1e-6)


def test_dropped_and_padding_tokens_output_exactly_zero():
    layer = make_layer(capacity_factor=0.25).eval()
    x_BNd = torch.randn(4, 16, 12)
    valid_BN = torch.rand(4, 16) > 0.3
    y_BNd, aux = layer(x_BNd, modality=torch.randint(0, 2, (4, 16)), valid=valid_BN)
    no_kept_S = ~aux.routing.kept_SK.any(1)
    assert bool(no_kept_S.any())
    assert bool((y_BNd.reshape(-1, 12)[no_kept_S] == 0).all())
    assert bool((y_BNd[~valid_BN] == 0).all())
    assert bool((y_BNd.reshape(-1, 12)[~no_kept_S] != 0).any(1).all())


def test_capacity_from_valid_tokens_counts_only_real_tokens():
    x_Sd = torch.randn(64, 12)
    valid_S = torch.arange(64) < 20  # 20 real tokens, 44 padding (a text pass of short captions)
    all_tokens = make_layer().eval()
    valid_only = make_layer(capacity_tokens="valid").eval()
    assert all_tokens(x_Sd, valid=valid_S)[1].routing.capacity == 16  # ceil(64 / 4) = 16
    y, aux = valid_only(x_Sd, valid=valid_S)
    assert aux.routing.capacity == 8  # ceil(20 / 4) = 5, rounded up to a multiple of 4
    # Same routing semantics otherwise: the loop reference with that capacity gives the same output.
    gates_SE = torch.softmax(x_Sd[valid_S] @ valid_only.router.router_dE, dim=-1)
    expected = moe_loop(valid_only.experts, x_Sd[valid_S], route_loop(gates_SE, 1, 8, True))
    torch.testing.assert_close(y[valid_S], expected, rtol=1e-5, atol=1e-6)
    assert valid_only(x_Sd)[1].routing.capacity == 16  # no mask: every token is real
    with pytest.raises(ValueError, match=r"capacity_tokens must be one of \('all', 'valid'\)"):
        MoeConfig(dim=4, hidden_dim=8, capacity_tokens="some")


def test_padding_does_not_change_routing_of_real_tokens():
    layer = make_layer(capacity_factor=0.5).eval()
    x_Sd = torch.randn(32, 12)
    valid_S = torch.arange(32) % 3 != 0
    y_a, aux_a = layer(x_Sd, valid=valid_S)
    x_b = x_Sd.clone()
    x_b[~valid_S] = torch.randn(int((~valid_S).sum()), 12) * 100  # garbage in the padding positions
    y_b, aux_b = layer(x_b, valid=valid_S)
    torch.testing.assert_close(y_a, y_b)
    assert torch.equal(aux_a.routing.kept_SK, aux_b.routing.kept_SK)
    for name in aux_a.losses:
        torch.testing.assert_close(aux_a.losses[name], aux_b.losses[name], msg=name)


def test_eval_is_deterministic_and_training_is_noisy():
    layer = make_layer(capacity_factor=0.5)
    x_Sd = torch.randn(64, 12)
    layer.eval()
    y1, aux1 = layer(x_Sd)
    y2, aux2 = layer(x_Sd)
    assert torch.equal(y1, y2) and torch.equal(aux1.routing.slot_SK, aux2.routing.slot_SK)
    assert float(aux1.losses["load"]) == 0.0  # the load loss needs router noise
    layer.train()
    with torch.no_grad():
        layer.router.router_dE.mul_(0.01)  # near-tied logits: noise of std 1/E must flip some choices
    torch.manual_seed(1)
    _, aux_t1 = layer(x_Sd)
    torch.manual_seed(2)
    _, aux_t2 = layer(x_Sd)
    assert not torch.equal(aux_t1.routing.expert_SK, aux_t2.routing.expert_SK)
    assert aux_t1.losses["load"].item() > 0.0


def test_train_and_eval_capacity_factors_are_separate():
    layer = make_layer(capacity_factor=1.0, eval_capacity_factor=2.0)
    assert layer.capacity_for(64) == 16
    assert layer.eval().capacity_for(64) == 32
    assert make_layer(capacity_factor=1.5).eval().capacity_for(64) == 24  # None follows the train factor


def test_set_eval_capacity_factor_changes_evaluation_drops_only():
    layer = make_layer(capacity_factor=1.0, eval_capacity_factor=0.5)
    model = torch.nn.Sequential(layer)
    x_Sd = torch.randn(64, 12)
    dropped = lambda: layer.eval()(x_Sd)[1].stats.dropped_M.sum().item()
    assert dropped() > 0  # 4 experts x 8 slots for 64 tokens
    assert set_eval_capacity_factor(model, 4.0) == 1
    assert layer.eval().capacity_for(64) == 64 and dropped() == 0  # factor E: room for every token
    assert layer.train().capacity_for(64) == 16  # training's factor is untouched
    assert layer.router.config is layer.config
    with pytest.raises(ValueError, match="no MoE layers"):
        set_eval_capacity_factor(torch.nn.Linear(2, 2), 2.0)
    with pytest.raises(ValueError, match="drop nothing"):
        set_eval_capacity_factor(make_layer(router="soft", slots_per_expert=2), 2.0)
    with pytest.raises(ValueError, match="> 0"):
        set_eval_capacity_factor(model, 0.0)


def test_gradients_reach_every_parameter():
    layer = make_layer(num_experts=4, k=2, capacity_factor=2.0).train()
    y, aux = layer(torch.randn(64, 12), modality=torch.arange(64) % 2)
    total = y.square().mean() + sum(aux.losses.values())
    total.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    # Every expert received tokens, so every expert's weights moved.
    assert bool((layer.experts.w_in_Edh.grad.abs().sum((1, 2)) > 0).all())


def test_router_runs_in_float32_under_bf16_autocast():
    layer = make_layer().eval()
    x_Sd = torch.randn(32, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x_Sd)
    assert aux.routing.gate_SK.dtype == torch.float32
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    y32, _ = layer(x_Sd)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)


def test_runs_on_meta_device():
    # Large models are sized on the meta device; the layer must trace there too.
    layer = MoeMlp(MoeConfig(dim=12, hidden_dim=20, num_experts=4)).to("meta")
    y, aux = layer(torch.empty(2, 8, 12, device="meta"), modality=1)
    assert y.shape == (2, 8, 12) and y.device.type == "meta" and aux.routing.capacity == 4


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_dense_dispatch_tensor_forward_or_backward():
    layer = make_layer(dim=8, hidden_dim=16, num_experts=8, k=2).train()
    x_Sd = torch.randn(512, 8, requires_grad=True)
    cap = layer.capacity_for(512)
    with _LargestTensor() as probe:
        y, aux = layer(x_Sd, modality=torch.arange(512) % 2)
        (y.sum() + sum(aux.losses.values())).backward()
    # The biggest legitimate tensor is the [E, C, h] hidden buffer; a one-hot [S, E, C] would be 32x larger.
    assert probe.largest <= 8 * cap * 16
    assert probe.largest * 16 < 512 * 8 * cap


@pytest.mark.parametrize("call, name", [
    (lambda m: m(torch.randn(4, 13)), "dim"),
    (lambda m: m(torch.randn(4, 12), modality=2), "modality"),
    (lambda m: m(torch.randn(4, 12), modality=-1), "modality"),
    (lambda m: m(torch.randn(4, 12), modality=torch.tensor([0, 1, 2, 0])), "modality"),
    (lambda m: m(torch.randn(4, 12), modality=torch.zeros(5, dtype=torch.long)), "modality"),
    (lambda m: m(torch.randn(4, 12), modality=torch.zeros(4)), "modality"),
    (lambda m: m(torch.randn(4, 12), valid=torch.ones(4)), "valid"),
    (lambda m: m(torch.randn(2, 4, 12), valid=torch.ones(8, dtype=torch.bool)), "valid"),
])
def test_forward_rejects_bad_inputs(call, name):
    with pytest.raises(ValueError, match=name):
        call(make_layer())


@pytest.mark.parametrize("overrides, name", [
    (dict(k=5), "k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(num_experts=0), "num_experts"),
    (dict(noise_std=-0.5), "noise_std"),
    (dict(modalities=("image", "image")), "modalities"),
    (dict(global_entropy_min_experts=(2.0,)), "global_entropy_min_experts"),
    (dict(global_entropy_min_experts=(2.0, 9.0)), "global_entropy_min_experts"),
    (dict(expert_backend="triton"), "expert_backend"),
])
def test_config_rejects_bad_values(overrides, name):
    with pytest.raises(ValueError, match=name):
        MoeConfig(**{"dim": 12, "hidden_dim": 20, "num_experts": 4, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("routing", [dict(k=2, capacity_factor=0.75),
                                     dict(router="expert_choice", capacity_factor=0.75, group_size=2),
                                     dict(router="soft", slots_per_expert=3, group_size=2)])
def test_compiles_as_one_graph_and_matches_eager(routing):
    layer = make_layer(**routing).eval()
    x_BNd = torch.randn(4, 16, 12)
    modality_BN, valid_BN = torch.arange(64).view(4, 16) % 2, torch.rand(4, 16) > 0.2

    def run(x):
        y, aux = layer(x, modality=modality_BN, valid=valid_BN)
        return y, aux.losses, aux.stats.processed_ME

    y_c, losses_c, processed_c = torch.compile(run, fullgraph=True)(x_BNd)
    y_e, losses_e, processed_e = run(x_BNd)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    assert torch.equal(processed_c, processed_e)
    for name in losses_e:
        torch.testing.assert_close(losses_c[name], losses_e[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    layer = make_layer(k=2, capacity_factor=0.75).eval()
    x_Sd = torch.randn(256, 12)
    y_cpu, aux_cpu = layer(x_Sd, modality=torch.arange(256) % 2)
    y_gpu, aux_gpu = layer.cuda()(x_Sd.cuda(), modality=(torch.arange(256) % 2).cuda())
    assert torch.equal(aux_cpu.routing.kept_SK, aux_gpu.routing.kept_SK.cpu())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)


# -- routing groups ---------------------------------------------------------------------------------------------
def _examples(batch=4, tokens=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x_BNd = torch.randn(batch, tokens, 12, generator=gen)
    modality_BN = torch.randint(0, 2, (batch, tokens), generator=gen)
    valid_BN = torch.rand(batch, tokens, generator=gen) > 0.2
    return x_BNd, modality_BN, valid_BN


@pytest.mark.parametrize("train", [False, True])
def test_groups_route_alone_split_batch_equals_halves(train):
    # Router noise off: with group_size G, a batch of 2G examples is exactly its two halves routed apart.
    layer = make_layer(capacity_factor=0.5, capacity_multiple_of=1, group_size=2, noise_std=0.0).train(train)
    x_BNd, modality_BN, valid_BN = _examples()
    y, aux = layer(x_BNd, modality=modality_BN, valid=valid_BN)
    halves = [layer(x_BNd[i:i + 2], modality=modality_BN[i:i + 2], valid=valid_BN[i:i + 2]) for i in (0, 2)]
    assert aux.routing.num_groups == 2 and aux.routing.capacity == layer.capacity_for(2 * 6)
    assert not bool(aux.routing.kept_SK[valid_BN.reshape(-1)].all())  # capacity binds
    torch.testing.assert_close(y, torch.cat([h[0] for h in halves]), rtol=1e-5, atol=1e-6)
    assert torch.equal(aux.routing.kept_SK, torch.cat([h[1].routing.kept_SK for h in halves]))
    assert torch.equal(aux.routing.slot_SK, torch.cat([h[1].routing.slot_SK for h in halves]))
    for name, value in aux.losses.items():  # each loss is the mean over groups
        torch.testing.assert_close(value, (halves[0][1].losses[name] + halves[1][1].losses[name]) / 2, msg=name)
    summed = halves[0][1].stats + halves[1][1].stats
    assert torch.equal(aux.stats.processed_ME, summed.processed_ME)
    # One group for the whole batch routes differently: groups are not a no-op.
    y_one, _ = make_layer(capacity_factor=0.5, capacity_multiple_of=1, noise_std=0.0).train(train)(
        x_BNd, modality=modality_BN, valid=valid_BN)
    assert not torch.allclose(y, y_one)


def test_last_group_is_filled_with_padding_examples():
    layer = make_layer(capacity_factor=0.5, group_size=4).eval()
    x_BNd, modality_BN, valid_BN = _examples(batch=6)
    y, aux = layer(x_BNd, modality=modality_BN, valid=valid_BN)
    assert y.shape == x_BNd.shape and aux.routing.kept_SK.shape[0] == 6 * 6 and aux.routing.num_groups == 2
    # Examples 4 and 5 form a group of their own, with the capacity of a full group of 4 examples.
    y_tail, aux_tail = layer(x_BNd[4:], modality=modality_BN[4:], valid=valid_BN[4:])
    assert aux_tail.routing.capacity == layer.capacity_for(4 * 6)
    torch.testing.assert_close(y[4:], y_tail, rtol=1e-5, atol=1e-6)
    y_head, _ = layer(x_BNd[:4], modality=modality_BN[:4], valid=valid_BN[:4])
    torch.testing.assert_close(y[:4], y_head, rtol=1e-5, atol=1e-6)
    # Padding examples are neither counted nor given slots.
    assert aux.stats.tokens_M.sum().item() == valid_BN.sum().item()
    assert aux.stats.processed_ME.sum().item() <= valid_BN.sum().item()


def test_batch_priority_orders_a_joint_group_across_modalities():
    # One group of 8 image tokens then 4 text tokens, all preferring expert 0; text tokens are more confident.
    # Capacity 6 per expert: in token order the images fill expert 0 and every text token drops; with BPR the
    # four text tokens claim their slots first.
    torch.manual_seed(0)
    layer = MoeMlp(MoeConfig(dim=4, hidden_dim=8, num_experts=2, capacity_multiple_of=1, group_size=1)).eval()
    with torch.no_grad():
        layer.router.router_dE.copy_(torch.tensor([[1.0, -1.0], [0, 0], [0, 0], [0, 0]]))
    x_1Nd = torch.zeros(1, 12, 4)
    x_1Nd[0, :8, 0] = torch.linspace(0.5, 1.0, 8)
    x_1Nd[0, 8:, 0] = 3.0
    modality_1N = torch.tensor([[0] * 8 + [1] * 4])
    for bpr, image_kept, text_kept in [(False, 6, 0), (True, 2, 4)]:
        layer.config.batch_priority = bpr
        _, aux = layer(x_1Nd, modality=modality_1N)
        assert aux.routing.capacity == 6
        assert aux.stats.top1_kept_M.tolist() == [image_kept, text_kept], bpr
    # With BPR the image tokens kept are the two most confident ones (the last two).
    assert aux.routing.kept_SK[:8, 0].tolist() == [False] * 6 + [True] * 2


def test_valid_capacity_is_per_group():
    layer = make_layer(capacity_factor=0.5, capacity_tokens="valid", capacity_multiple_of=1, group_size=1).eval()
    x_BNd, modality_BN, _ = _examples(batch=2, tokens=16)
    valid_BN = torch.zeros(2, 16, dtype=torch.bool)
    valid_BN[0, :], valid_BN[1, :3] = True, True  # capacities ceil(16 * 0.5 / 4) = 2 and ceil(3 * 0.5 / 4) = 1
    y, aux = layer(x_BNd, modality=modality_BN, valid=valid_BN)
    assert aux.routing.capacity == 2  # the larger of the two groups' capacities (2 and 1)
    for b in range(2):
        y_b, aux_b = layer(x_BNd[b:b + 1], modality=modality_BN[b:b + 1], valid=valid_BN[b:b + 1])
        assert aux_b.routing.capacity == (2, 1)[b]
        torch.testing.assert_close(y[b], y_b[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(aux.routing.kept_SK[b * 16:(b + 1) * 16], aux_b.routing.kept_SK)


def test_group_size_and_routing_groups_are_checked():
    with pytest.raises(ValueError, match="group_size"):
        MoeConfig(dim=4, hidden_dim=8, group_size=0)
    with pytest.raises(ValueError, match="routing_groups"):
        MoeConfig(dim=4, hidden_dim=8, routing_groups="mixed")


def test_router_and_expert_init_follow_vmoe():
    # Router: flax Dense's lecun_normal (normal truncated at 2 std, std 1/sqrt(d) after truncation).
    layer = MoeMlp(MoeConfig(dim=256, hidden_dim=64, num_experts=32))
    w = layer.router.router_dE.detach()
    assert abs(w.std().item() * 256 ** 0.5 - 1.0) < 0.05
    assert w.abs().max().item() <= 2 * 256 ** -0.5 / 0.8796 + 1e-6
    # Experts: one draw shared by all (V-MoE initialises them without splitting the RNG), unless asked otherwise.
    shared = layer.experts
    assert all(torch.equal(shared.w_in_Edh[0], shared.w_in_Edh[e]) for e in range(32))
    independent = MoeMlp(MoeConfig(dim=256, hidden_dim=64, num_experts=4, expert_init="independent")).experts
    assert not torch.equal(independent.w_out_Ehd[0], independent.w_out_Ehd[1])
