"""The two expert backends (capacity-padded bmm, packed grouped_mm) compute the same layer, forward and backward.

CPU tests force grouped_mm (torch's reference loop over groups); CUDA tests need a GPU with the fused kernel.
"""

import pytest
import torch

from limoe.moe import MoeConfig, MoeMlp, Routing
from limoe.moe.dispatch import packed_rows
from limoe.moe.experts import GROUP_ROW_ALIGN, resolve_expert_backend
from limoe.moe.reference import moe_loop

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def make_pair(device="cpu", seed=0, **overrides):
    """Two layers with identical weights, one per backend."""
    cfg = dict(dim=16, hidden_dim=24, num_experts=4, k=1, capacity_factor=1.0)
    cfg.update(overrides)
    layers = []
    for backend in ("bmm", "grouped_mm"):
        torch.manual_seed(seed)
        layer = MoeMlp(MoeConfig(**cfg, expert_backend=backend))
        with torch.no_grad():
            layer.router.router_dE.normal_(0, 1.0)  # sharp router: uneven loads, so capacity binds and slots stay empty
        layers.append(layer.to(device))
    return layers


def run(layer, x_BNd, modality_BN, valid_BN, seed=1):
    """Forward + backward of one training-mode call; returns output, aux losses and every gradient."""
    x_BNd = x_BNd.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same router noise for both backends
    y_BNd, aux = layer(x_BNd, modality=modality_BN, valid=valid_BN)
    loss = (y_BNd.float() * torch.linspace(-1, 1, y_BNd.numel(), device=y_BNd.device).view_as(y_BNd)).sum()
    (loss + sum(aux.losses.values())).backward()
    grads = {"x": x_BNd.grad, **{name: p.grad for name, p in layer.named_parameters()}}
    return y_BNd, aux, grads


def inputs(device="cpu", batch=4, tokens=24, dim=16):
    gen = torch.Generator().manual_seed(7)
    x_BNd = torch.randn(batch, tokens, dim, generator=gen)
    modality_BN = torch.randint(0, 2, (batch, tokens), generator=gen)
    valid_BN = torch.rand(batch, tokens, generator=gen) > 0.2
    return x_BNd.to(device), modality_BN.to(device), valid_BN.to(device)


@needs_grouped_mm
@pytest.mark.parametrize("k, bpr, cf, group_size", [(1, False, 1.0, None), (1, True, 0.5, None), (2, True, 0.5, None),
                                                    (2, False, 2.0, None), (1, True, 0.5, 1), (2, True, 0.75, 3)])
def test_backends_agree_forward_and_every_gradient(k, bpr, cf, group_size):
    # group_size 3 of 4 examples: two routing groups, the second filled up with padding examples.
    bmm, grouped = make_pair(k=k, batch_priority=bpr, capacity_factor=cf, group_size=group_size)
    args = inputs()
    y_b, aux_b, grads_b = run(bmm, *args)
    y_g, aux_g, grads_g = run(grouped, *args)
    assert torch.equal(aux_b.routing.kept_SK, aux_g.routing.kept_SK)
    if cf < 1:  # capacity binds, so dropped assignments are part of the check
        assert not bool(aux_b.routing.kept_SK[args[2].reshape(-1)].all())
    torch.testing.assert_close(y_g, y_b, rtol=1e-5, atol=1e-6)
    for name in aux_b.losses:
        torch.testing.assert_close(aux_g.losses[name], aux_b.losses[name], msg=name)
    for name, g in grads_b.items():
        assert g is not None and grads_g[name] is not None, name
        torch.testing.assert_close(grads_g[name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


@needs_grouped_mm
def test_backends_agree_under_bf16_autocast():
    bmm, grouped = make_pair(capacity_factor=1.25)
    args = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_b, _, grads_b = run(bmm, *args)
        y_g, _, grads_g = run(grouped, *args)
    assert y_g.dtype == y_b.dtype == torch.bfloat16
    torch.testing.assert_close(y_g.float(), y_b.float(), rtol=2e-2, atol=2e-2)
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_g[name].float(), g.float(), rtol=5e-2, atol=5e-2, msg=name)


class _PoisonOutsideGroups(torch.autograd.Function):
    """torch._grouped_mm, but rows past the last group hold NaN in the output and in the input gradient.

    The real kernels leave those rows uninitialised; poisoning them makes the test deterministic.
    """

    real = staticmethod(torch._grouped_mm) if hasattr(torch, "_grouped_mm") else None

    @staticmethod
    def poison(t_Rx, offs_E):
        rows_R = torch.arange(t_Rx.shape[0], device=t_Rx.device)
        return torch.where((rows_R >= offs_E[-1])[:, None], float("nan"), t_Rx)

    @staticmethod
    def forward(ctx, a_Rk, b_Ekn, offs_E):
        ctx.save_for_backward(a_Rk, b_Ekn, offs_E)
        return _PoisonOutsideGroups.poison(_PoisonOutsideGroups.real(a_Rk, b_Ekn, offs=offs_E), offs_E)

    @staticmethod
    def backward(ctx, grad_Rn):
        a_Rk, b_Ekn, offs_E = ctx.saved_tensors
        with torch.enable_grad():
            a, b = a_Rk.detach().requires_grad_(True), b_Ekn.detach().requires_grad_(True)
            out = _PoisonOutsideGroups.real(a, b, offs=offs_E)
            grad_a, grad_b = torch.autograd.grad(out, (a, b), grad_Rn.contiguous())
        return _PoisonOutsideGroups.poison(grad_a, offs_E), grad_b, None


@needs_grouped_mm
@pytest.mark.parametrize("all_padding", [False, True])
def test_rows_outside_groups_never_leak(monkeypatch, all_padding):
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: _PoisonOutsideGroups.apply(a, b, offs))
    bmm, grouped = make_pair(capacity_factor=2.0)  # half the rows are empty
    x_BNd, modality_BN, valid_BN = inputs()
    if all_padding:  # nothing kept: every row lies outside the groups
        valid_BN = torch.zeros_like(valid_BN)
    y_b, _, grads_b = run(bmm, x_BNd, modality_BN, valid_BN)
    y_g, _, grads_g = run(grouped, x_BNd, modality_BN, valid_BN)
    assert bool(torch.isfinite(y_g).all())
    torch.testing.assert_close(y_g, y_b, rtol=1e-5, atol=1e-6)
    for name, g in grads_b.items():
        assert bool(torch.isfinite(grads_g[name]).all()), name
        torch.testing.assert_close(grads_g[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("group_size", [None, 1])
def test_packed_rows_are_aligned_disjoint_groups(group_size):
    _, grouped = make_pair(num_experts=4, k=2, capacity_factor=0.75, group_size=group_size)
    x_BNd, modality_BN, valid_BN = inputs()
    _, aux = grouped(x_BNd, modality=modality_BN, valid=valid_BN)
    routing = aux.routing
    row_SK, group_end_E, num_rows = packed_rows(routing)
    assert group_end_E.dtype == torch.int32 and bool((group_end_E % GROUP_ROW_ALIGN == 0).all())
    assert int(group_end_E[-1]) <= num_rows and num_rows % GROUP_ROW_ALIGN == 0
    kept_rows = row_SK[routing.kept_SK]
    assert kept_rows.unique().numel() == kept_rows.numel()  # no two assignments share a row
    group_start_E = torch.cat([group_end_E.new_zeros(1), group_end_E[:-1]]).long()
    experts = routing.expert_SK[routing.kept_SK]
    assert bool((kept_rows >= group_start_E[experts]).all() and (kept_rows < group_end_E.long()[experts]).all())


def test_auto_picks_bmm_without_a_fast_grouped_kernel():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert resolve_expert_backend("auto", cpu, dtype, 768, 3072) == "bmm"
    assert resolve_expert_backend("auto", torch.device("cuda"), torch.float32, 768, 3072) == "bmm"
    assert resolve_expert_backend("auto", torch.device("meta"), torch.bfloat16, 768, 3072) == "bmm"


@needs_grouped_mm
@pytest.mark.parametrize("dtype, dim", [(torch.float32, 768), (torch.bfloat16, 12)])
def test_grouped_mm_on_cuda_refuses_the_syncing_fallback(dtype, dim):
    # fp32 or misaligned widths would run torch's fallback loop, which copies offsets to the host every call.
    with pytest.raises(ValueError, match="grouped_mm"):
        resolve_expert_backend("grouped_mm", torch.device("cuda"), dtype, dim, 3072)


@pytest.mark.parametrize("backend", ["cutlass", "", "GROUPED_MM"])
def test_config_rejects_unknown_backend(backend):
    with pytest.raises(ValueError, match="expert_backend"):
        MoeConfig(dim=16, hidden_dim=24, expert_backend=backend)


@needs_grouped_mm
@pytest.mark.slow
def test_grouped_mm_compiles_as_one_graph_under_bf16_autocast():
    _, grouped = make_pair(k=2, capacity_factor=1.25)
    grouped.eval()  # no router noise: compiled code draws random numbers differently from eager
    x_BNd, modality_BN, valid_BN = inputs()

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = grouped(x, modality=modality_BN, valid=valid_BN)
        return y.float().sum() + sum(aux.losses.values())

    x_c, x_e = x_BNd.clone().requires_grad_(True), x_BNd.clone().requires_grad_(True)
    torch.compile(step, fullgraph=True)(x_c).backward()
    step(x_e).backward()
    torch.testing.assert_close(x_c.grad, x_e.grad, rtol=5e-2, atol=5e-2)


# -- CUDA: run where a GPU is present -----------------------------------------------------------------------------
def _fast_grouped_mm() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)
            and hasattr(torch, "_grouped_mm"))


needs_fused_grouped_mm = pytest.mark.skipif(not _fast_grouped_mm(),
                                            reason="needs the fused grouped_mm kernel (sm90/sm100)")
BOTH_BACKENDS_ON_CUDA = ["bmm", pytest.param("grouped_mm", marks=needs_fused_grouped_mm)]


def cuda_test(test):
    """Marked `cuda` (selected by `pytest -m cuda`) and skipped where no GPU is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def _rel_err(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


@cuda_test
@pytest.mark.parametrize("backend", BOTH_BACKENDS_ON_CUDA)
def test_cuda_bf16_matches_cpu_reference(backend):
    layer = make_pair(dim=64, hidden_dim=128, num_experts=8, k=1, capacity_factor=1.0)[backend == "grouped_mm"].eval()
    x_Sd = torch.randn(2048, 64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_gpu, aux_gpu = layer.cuda()(x_Sd.cuda())
    # The reference: a Python loop over experts in float32 on the CPU, on the routing the GPU chose.
    r = aux_gpu.routing
    routing = Routing(r.expert_SK.cpu(), r.slot_SK.cpu(), r.gate_SK.cpu(), r.kept_SK.cpu(), r.capacity, r.num_experts)
    y_ref = moe_loop(layer.cpu().experts, x_Sd, routing)
    assert not bool(routing.kept_SK.all())  # capacity binds: dropped tokens are part of the check
    assert _rel_err(y_gpu.cpu(), y_ref) < 2e-2
    _, aux_cpu = layer(x_Sd)  # same routing code on the CPU; float32 routers, so only rare near-ties may differ
    assert (aux_cpu.routing.kept_SK == routing.kept_SK).float().mean() > 0.99


@cuda_test
@needs_fused_grouped_mm
def test_cuda_backends_agree_in_bf16_forward_and_backward():
    bmm, grouped = make_pair("cuda", dim=64, hidden_dim=128, num_experts=8, k=2, capacity_factor=1.25)
    args = inputs("cuda", batch=8, tokens=256, dim=64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_b, aux_b, grads_b = run(bmm, *args)
        y_g, aux_g, grads_g = run(grouped, *args)
    assert torch.equal(aux_b.routing.kept_SK, aux_g.routing.kept_SK)
    assert _rel_err(y_g, y_b) < 1e-2
    for name, g in grads_b.items():
        assert _rel_err(grads_g[name], g) < 2e-2, name


@cuda_test
@pytest.mark.parametrize("backend", BOTH_BACKENDS_ON_CUDA)
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_cuda_layer_never_syncs_with_the_host(backend, phase):
    layer = make_pair("cuda", dim=64, hidden_dim=128, num_experts=8, k=2, batch_priority=True)[
        backend == "grouped_mm"].train()
    x_BNd, modality_BN, valid_BN = inputs("cuda", batch=8, tokens=64, dim=64)
    x_BNd.requires_grad_(True)

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = layer(x_BNd, modality=modality_BN, valid=valid_BN)
        return y.float().sum() + sum(aux.losses.values())

    forward().backward()  # warm-up: library handles and caches are set up outside the checked region
    torch.cuda.synchronize()
    try:
        if phase == "forward":
            torch.cuda.set_sync_debug_mode("error")
            loss = forward()
        else:
            loss = forward()
            torch.cuda.set_sync_debug_mode("error")
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@cuda_test
@needs_fused_grouped_mm
def test_cuda_grouped_mm_compiles_as_one_graph():
    bmm, grouped = make_pair("cuda", dim=64, hidden_dim=128, num_experts=8, k=1, capacity_factor=1.0)
    x_Sd = torch.randn(4096, 64, device="cuda")

    def step(layer, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = layer(x)
        return y.float().square().mean() + sum(aux.losses.values())

    grouped.eval(), bmm.eval()
    compiled = torch.compile(lambda x: step(grouped, x), fullgraph=True)
    x_c, x_e = x_Sd.clone().requires_grad_(True), x_Sd.clone().requires_grad_(True)
    compiled(x_c).backward()
    step(bmm, x_e).backward()
    assert _rel_err(x_c.grad, x_e.grad) < 2e-2
