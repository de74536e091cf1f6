"""Expert parallelism on CPU with gloo: 2- and 4-process worlds spawned by the test, compared to MoeMlp.

Routing groups are per rank, so the reference for rank r is the single-process MoeMlp (all experts, same weights)
applied to rank r's tokens alone. Every rank computes the reference for all ranks itself (token groups are seeded
by rank), so references need no communication. Each world is spawned once per module and runs every scenario;
a scenario returns mismatch messages instead of raising, so that no rank stops early while its peers sit in a
collective.
"""

from __future__ import annotations

import copy
import json
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from limoe.moe import MoeConfig, MoeMlp
from limoe.moe.parallel import ExpertParallelMoeMlp, expert_state_keys, load_full_state_dict, shard_state_dict
from limoe.parallel.expert_parallel import ExpertParallel
from limoe.parallel.mesh import ExpertParallelGroups, check_expert_parallel, expert_parallel_groups
from limoe.parallel.world import World

DIM, HIDDEN = 8, 16


# -- harness ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)  # the machine's cores are shared by all ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))  # a failing peer turns into an error, not a hang
    results = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name](rank, world_size, Path(out_dir))
        except Exception:  # noqa: BLE001 - reported by the test that owns the scenario
            results[name] = [traceback.format_exc()]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # leave together: tearing gloo down under a busy peer can abort it
    dist.destroy_process_group()


def run_world(world_size: int, names: list[str], out_dir: Path, timeout_s: float = 180) -> dict[str, list[str]]:
    """Spawn `world_size` ranks that run the named scenarios; failure messages per scenario, all ranks merged."""
    ctx = mp.start_processes(_worker, args=(world_size, _free_port(), str(out_dir), names), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError(f"{world_size}-rank world did not finish in {timeout_s} s")
    merged: dict[str, list[str]] = {name: [] for name in names}
    for rank in range(world_size):
        for name, fails in json.loads((out_dir / f"rank{rank}.json").read_text()).items():
            merged[name] += [f"rank {rank}: {msg}" for msg in fails]
    return merged


def _close(fails: list[str], what: str, got: torch.Tensor, want: torch.Tensor, **tol) -> None:
    try:
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
    except AssertionError as err:
        fails.append(f"{what}: {err}")


# -- scenarios --------------------------------------------------------------------------------------------------
def _reference_layer(cfg: MoeConfig, dtype=torch.float32) -> MoeMlp:
    torch.manual_seed(0)
    layer = MoeMlp(cfg).to(dtype)
    with torch.no_grad():  # a sharp router, so that gates differ visibly between experts
        layer.router.router_dE.normal_(0, 1.0)
    return layer


def _ep_copy(ref: nn.Module, make, groups: ExpertParallelGroups) -> nn.Module:
    """An EP model built by `make` holding `ref`'s weights (this rank's expert shard)."""
    model = make().to(next(ref.parameters()).dtype)
    load_full_state_dict(model, ref.state_dict(), groups)
    return model


def _merge_state_dicts(shards: list[dict[str, torch.Tensor]], expert_keys: list[str]) -> dict[str, torch.Tensor]:
    """The single-process state dict from the state dicts of EP ranks 0..P-1 (no collectives)."""
    out = dict(shards[0])
    for key in expert_keys:
        out[key] = torch.cat([shard[key] for shard in shards])
    return out


def _gather_full_state_dict(model: nn.Module, groups: ExpertParallelGroups) -> dict[str, torch.Tensor]:
    """The single-process state dict on every rank: expert shards all-gathered over the EP group, in rank order."""
    out = model.state_dict()
    for key in expert_state_keys(model):
        parts = [torch.empty_like(out[key]) for _ in range(groups.ep_size)]
        dist.all_gather(parts, out[key].contiguous(), group=groups.ep_group)
        out[key] = torch.cat(parts)
    return out


def _tokens(rank: int, seed: int, num_tokens: int, kind: str = "random"):
    """Rank `rank`'s token group: x, modality ids, valid mask, output cotangent."""
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(num_tokens, DIM, generator=gen)
    modality = torch.randint(0, 2, (num_tokens,), generator=gen)
    valid = torch.rand(num_tokens, generator=gen) > 0.2
    if kind == "one_expert":  # x[:, 0] = 3 and the router's row 0 favours expert 0: every token picks expert 0
        x[:, 0] = 3.0
    if kind == "all_padding":
        valid[:] = False
    return x, modality, valid, torch.randn(num_tokens, DIM, generator=gen)


def _check_layer(rank, groups, cfg, train, kinds, fails, tag, num_tokens=24):
    """EP outputs, aux losses and gradients (input and every parameter) against MoeMlp on each rank's tokens."""
    ref = _reference_layer(cfg)
    if "one_expert" in kinds.values():
        with torch.no_grad():
            ref.router.router_dE[0] = -5.0
            ref.router.router_dE[0, 0] = 5.0
    ep = _ep_copy(ref, lambda: ExpertParallelMoeMlp(cfg, groups), groups)
    ref.train(train), ep.train(train)

    def loss_and_grads(layer, r):
        x, modality, valid, g_out = _tokens(r, 1, num_tokens, kinds.get(r, "random"))
        x.requires_grad_(True)
        torch.manual_seed(1000 + r)  # the same router noise for the EP layer and the reference
        y, aux = layer(x, modality, valid)
        aux_total = sum(v for v in aux.losses.values() if torch.isfinite(v))
        grads = torch.autograd.grad((y * g_out).sum() + aux_total, [x, *layer.parameters()], allow_unused=True)
        return y, aux, grads

    y, aux, grads = loss_and_grads(ep, rank)
    first = rank - groups.ep_rank
    refs = {r: loss_and_grads(ref, r) for r in range(first, first + groups.ep_size)}
    y_ref, aux_ref, grads_ref = refs[rank]
    if kinds.get(rank) == "one_expert" and not bool((aux.routing.expert_SK[:, 0] == 0).all()):
        fails.append(f"{tag}: the uneven scenario did not send every token to expert 0")
    if not torch.equal(aux.routing.kept_SK, aux_ref.routing.kept_SK):
        fails.append(f"{tag}: routing differs")
    _close(fails, f"{tag} output", y, y_ref, rtol=1e-5, atol=1e-6)
    for name in aux_ref.losses:
        _close(fails, f"{tag} aux {name}", aux.losses[name], aux_ref.losses[name], rtol=1e-5, atol=1e-6)
    names = ["x", *(n for n, _ in ep.named_parameters())]
    local = groups.local_experts(cfg.num_experts)
    for i, (name, got) in enumerate(zip(names, grads)):
        if name.startswith("experts."):
            # A shard's gradient collects the losses of every rank of the EP group (through all_to_all).
            want = sum(refs[r][2][i] for r in refs)[local.start:local.stop]
        else:
            want = grads_ref[i]
        _close(fails, f"{tag} grad {name}", got, want, rtol=1e-4, atol=1e-5)


def scenario_outputs_and_grads(rank, world_size, out_dir):
    fails = []
    for ep_size in sorted({2, world_size}):
        groups = expert_parallel_groups(ep_size)
        _check_layer(rank, groups, MoeConfig(DIM, HIDDEN, num_experts=4, k=1, noise_std=1.0), True, {}, fails,
                     f"ep={ep_size} k=1 bpr train")
        _check_layer(rank, groups, MoeConfig(DIM, HIDDEN, num_experts=8, k=2, capacity_factor=0.75,
                                             batch_priority=False), False, {}, fails, f"ep={ep_size} k=2 eval")
        # Routing groups: each rank's 24 tokens (one token per example) are 4 groups of 6 with their own slots;
        # the exchange carries every group's slots of an expert.
        _check_layer(rank, groups, MoeConfig(DIM, HIDDEN, num_experts=4, k=2, capacity_multiple_of=1,
                                             group_size=6), True, {}, fails, f"ep={ep_size} k=2 groups of 6")
    return fails


def scenario_uneven(rank, world_size, out_dir):
    fails = []
    groups = expert_parallel_groups(world_size)
    cfg = MoeConfig(DIM, HIDDEN, num_experts=4, k=1, noise_std=0.0)
    # Rank 0: every token wants expert 0 (most drop; rank 0 sends nothing to the other experts). Last rank: padding
    # only, so it routes nothing at all but still serves its experts to the others.
    kinds = {0: "one_expert", world_size - 1: "all_padding"}
    _check_layer(rank, groups, cfg, True, kinds, fails, "uneven")
    return fails


class _Net(nn.Module):
    """Linear -> MoE with residual: a non-expert parameter before the MoE, so both reduction paths are used."""

    def __init__(self, moe: MoeMlp):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.moe = moe

    def loss(self, x, target, seed):
        h = self.inp(x)
        torch.manual_seed(seed)
        y, aux = self.moe(h)
        return ((h + y - target) ** 2).mean() + 0.01 * sum(aux.losses.values())


def scenario_training(rank, world_size, out_dir):
    """AdamW steps with the `ExpertParallel` strategy's gradient reduction and clipping equal single-process steps
    on the mean of the per-rank losses."""
    fails = []
    cfg = MoeConfig(DIM, HIDDEN, num_experts=4, k=1, noise_std=1.0)
    for ep_size in sorted({2, world_size}):
        torch.manual_seed(0)
        ref = _Net(MoeMlp(cfg)).double()  # float64: Adam's normalisation would magnify float32 rounding
        ep = copy.deepcopy(ref)
        strategy = ExpertParallel(World(rank, world_size), torch.device("cpu"), ep_size, cfg.num_experts)
        strategy.shard(ep)
        groups = strategy.groups
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt_ep = torch.optim.AdamW(ep.parameters(), lr=1e-2)

        def data(r, step):
            gen = torch.Generator().manual_seed(step * 100 + r)
            return torch.randn(16, DIM, generator=gen).double(), torch.randn(16, DIM, generator=gen).double()

        for step in range(3):
            loss = ep.loss(*data(rank, step), seed=step * 100 + rank)
            loss.backward()
            strategy.reduce_gradients(ep)
            ref_losses = [ref.loss(*data(r, step), seed=step * 100 + r) for r in range(world_size)]
            torch.stack(ref_losses).mean().backward()
            # The norm of the whole model (in float32, hence the tolerance); too high a bound to clip, so that the
            # float64 comparisons below stay exact.
            norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
            _close(fails, f"ep={ep_size} step {step} norm", strategy.clip_grad_norm(ep, 1e9).double(), norm_ref,
                   rtol=1e-6, atol=0)
            # Gradients directly, not only through losses: Adam is nearly blind to a wrong gradient scale.
            local = groups.local_experts(cfg.num_experts)
            for (name, p), p_ref in zip(ep.named_parameters(), ref.parameters()):
                want = p_ref.grad[local.start:local.stop] if ".experts." in name else p_ref.grad
                _close(fails, f"ep={ep_size} step {step} grad {name}", p.grad, want, rtol=1e-9, atol=1e-12)
            opt_ep.step(), opt_ep.zero_grad()
            opt_ref.step(), opt_ref.zero_grad()
            _close(fails, f"ep={ep_size} step {step} loss", loss.detach(), ref_losses[rank].detach(),
                   rtol=1e-10, atol=1e-12)
        full = _gather_full_state_dict(ep, groups)
        for key, value in ref.state_dict().items():
            _close(fails, f"ep={ep_size} final {key}", full[key], value, rtol=1e-9, atol=1e-12)
        named = {n for n, _ in ep.named_parameters()}
        if named & set(expert_state_keys(ep)) != {n for n in named if ".experts." in f".{n}"}:
            fails.append(f"ep={ep_size}: expert_state_keys does not name exactly the expert parameters")
    return fails


def scenario_checkpoints(rank, world_size, out_dir):
    """Write with one EP size, load with others: same full state dict and the same outputs on the same tokens."""
    fails = []
    cfg = MoeConfig(DIM, HIDDEN, num_experts=4, k=1)
    ref = _reference_layer(cfg).eval()
    x = _tokens(rank, 2, 24)[0]
    y_ref = ref(x)[0]
    sizes = [s for s in (1, 2, 4) if world_size % s == 0]
    groups = {s: expert_parallel_groups(s) for s in sizes}  # collective: every rank builds every size
    layers = {}
    for src in sizes:
        # Build a layer of EP size `src` from the previous size's checkpoint file (the first from the reference).
        prev = out_dir / f"full_ep{sizes[sizes.index(src) - 1]}.pt" if src != sizes[0] else None
        full = torch.load(prev) if prev else ref.state_dict()
        layer = ExpertParallelMoeMlp(cfg, groups[src]).eval()
        load_full_state_dict(layer, full, groups[src])
        layers[src] = layer
        written = _gather_full_state_dict(layer, groups[src])
        if rank == 0:
            torch.save(written, out_dir / f"full_ep{src}.pt")
        torch.save(layer.state_dict(), out_dir / f"ep{src}_rank{rank}.pt")  # per-rank files, merged offline
        dist.barrier()
        for key, value in ref.state_dict().items():
            _close(fails, f"ep={src} gathered {key}", written[key], value, rtol=0, atol=0)
        merged = _merge_state_dicts([torch.load(out_dir / f"ep{src}_rank{r}.pt") for r in range(src)],
                                   expert_state_keys(layer))
        for key, value in ref.state_dict().items():
            _close(fails, f"ep={src} merged {key}", merged[key], value, rtol=0, atol=0)
        _close(fails, f"ep={src} output", layer(x)[0], y_ref, rtol=1e-5, atol=1e-6)
    # And back down: the largest size's file loads into every smaller size and into a plain MoeMlp.
    full = torch.load(out_dir / f"full_ep{sizes[-1]}.pt")
    plain = MoeMlp(cfg).eval()
    plain.load_state_dict(full)
    _close(fails, f"ep={sizes[-1]} -> plain output", plain(x)[0], y_ref, rtol=0, atol=0)
    for dst in sizes[:-1]:
        load_full_state_dict(layers[dst], full, groups[dst])
        _close(fails, f"ep={sizes[-1]} -> {dst} output", layers[dst](x)[0], y_ref, rtol=1e-5, atol=1e-6)
    return fails


def scenario_bad_configs(rank, world_size, out_dir):
    fails = []
    cases = {
        "world not a multiple": (lambda: expert_parallel_groups(world_size + 1), "not a multiple"),
        "experts not divisible": (lambda: ExpertParallelMoeMlp(MoeConfig(DIM, HIDDEN, num_experts=3),
                                                               expert_parallel_groups(2)), "not divisible"),
        "shard not divisible": (lambda: shard_state_dict(_reference_layer(MoeConfig(DIM, HIDDEN, 4)).state_dict(),
                                                         ["experts.w_in_Edh"], 0, 8), "not divisible"),
    }
    for what, (make, needle) in cases.items():
        try:
            make()
            fails.append(f"{what}: no ValueError")
        except ValueError as err:
            if needle not in str(err):
                fails.append(f"{what}: unclear message {err}")
    return fails


SCENARIOS = {f.__name__.removeprefix("scenario_"): f for f in
             (scenario_outputs_and_grads, scenario_uneven, scenario_training, scenario_checkpoints,
              scenario_bad_configs)}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_world(2, list(SCENARIOS), tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_world(4, [n for n in SCENARIOS if n != "bad_configs"], tmp_path_factory.mktemp("world4"))


# -- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks(world2, scenario):
    assert world2[scenario] == [], "\n".join(world2[scenario])


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["outputs_and_grads", "uneven", "training", "checkpoints"])
def test_four_ranks(world4, scenario):
    assert world4[scenario] == [], "\n".join(world4[scenario])


def test_check_expert_parallel_errors():
    check_expert_parallel(ep_size=2, world_size=4, num_experts=8)
    for kwargs, needle in [(dict(ep_size=0, world_size=4), ">= 1"),
                           (dict(ep_size=3, world_size=4), "world size 4 is not a multiple"),
                           (dict(ep_size=2, world_size=4, num_experts=5), "num_experts=5 is not divisible")]:
        with pytest.raises(ValueError, match=needle):
            check_expert_parallel(**kwargs)


def test_expert_parallel_groups_needs_init():
    with pytest.raises(ValueError, match="init_process_group"):
        expert_parallel_groups(2)


def test_shard_and_merge_round_trip_with_moe_keys():
    model = nn.ModuleDict({"block": nn.ModuleDict({"mlp": MoeMlp(MoeConfig(DIM, HIDDEN, num_experts=8))})})
    keys = expert_state_keys(model)
    assert keys == [f"block.mlp.experts.{n}" for n in ("w_in_Edh", "b_in_Eh", "w_out_Ehd", "b_out_Ed")]
    full = model.state_dict()
    shards = [shard_state_dict(full, keys, r, 4) for r in range(4)]
    assert shards[1]["block.mlp.experts.w_in_Edh"].shape == (2, DIM, HIDDEN)
    assert torch.equal(shards[3]["block.mlp.router_dE"], full["block.mlp.router_dE"])
    merged = _merge_state_dicts(shards, keys)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    groups = ExpertParallelGroups(ep_size=4, ep_rank=1, world_size=8, ep_group=None, expert_dp_group=None)
    assert groups.local_experts(8) == range(2, 4) and groups.expert_dp_size == 2
