"""The device mesh of expert parallelism (EP) composed with data parallelism, and gradient averaging.

With world size W and EP size P (W a multiple of P), ranks [0..P-1], [P..2P-1], ... form the EP groups: each
group holds all E experts, E/P per rank, and exchanges tokens inside itself. Ranks holding the same expert shard
(same rank modulo P) form the expert-data-parallel groups, W/P ranks each. Non-expert parameters are replicated
on all W ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

EXPERT_PARALLEL_ATTR = "_expert_parallel"  # set True on parameters sharded over an EP group


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the EP x expert-data-parallel grid. Build with `expert_parallel_groups`."""

    ep_size: int
    ep_rank: int  # index of this rank's expert shard: rank % ep_size
    world_size: int
    ep_group: dist.ProcessGroup | None  # the P ranks that exchange tokens with this one
    expert_dp_group: dist.ProcessGroup | None  # the W/P ranks holding the same experts
    mesh: DeviceMesh | None = None  # the mesh both come from (see `device_mesh`)

    @property
    def expert_dp_size(self) -> int:
        return self.world_size // self.ep_size

    def local_experts(self, num_experts: int) -> range:
        """Global indices of the experts this rank holds (contiguous, so shards concatenate in rank order)."""
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def check_expert_parallel(ep_size: int, world_size: int, num_experts: int | None = None) -> None:
    """Raise ValueError if experts cannot be split evenly over EP groups that tile the world."""
    if ep_size < 1:
        raise ValueError(f"expert-parallel size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ValueError(f"world size {world_size} is not a multiple of the expert-parallel size {ep_size}")
    if num_experts is not None and num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}")


def device_mesh(ep_size: int = 1, device_type: str | None = None) -> DeviceMesh:
    """The run's one DeviceMesh, every process group comes from: dims ("expert_dp", "ep") of sizes (W/P, P), so
    "ep" groups are blocks of P consecutive ranks and "expert_dp" groups hold the ranks with the same experts.
    Data parallelism (and FSDP's sharding of everything but the experts) spans the whole mesh. Collective."""
    if not dist.is_initialized():
        raise ValueError("a device mesh needs torch.distributed initialised (init_process_group)")
    world_size = dist.get_world_size()
    check_expert_parallel(ep_size, world_size)
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("expert_dp", "ep"))


def whole_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """All ranks of `mesh` as one dimension ("dp"), the mesh FSDP shards replicated parameters over."""
    if mesh.ndim == 1:
        return mesh
    # A flattened view of the same mesh, not a second one: torchtitan's way; the only way torch offers so far.
    return mesh._flatten("dp")


def expert_parallel_groups(ep_size: int, num_experts: int | None = None,
                           mesh: DeviceMesh | None = None) -> ExpertParallelGroups:
    """The EP and expert-data-parallel groups of `mesh` (built by `device_mesh` when None; then collective:
    every rank must call it, in the same order)."""
    if not dist.is_initialized():
        raise ValueError("expert parallelism needs torch.distributed initialised (init_process_group)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_expert_parallel(ep_size, world_size, num_experts)
    mesh = mesh if mesh is not None else device_mesh(ep_size)
    return ExpertParallelGroups(ep_size, rank % ep_size, world_size, mesh.get_group("ep"),
                                mesh.get_group("expert_dp"), mesh)


class _AllToAllEqual(torch.autograd.Function):
    """all_to_all_single with equal splits along dim 0; its backward is the same exchange of the gradient.

    A small Function over the public `dist.all_to_all_single` rather than `torch.distributed.nn.functional`,
    which is deprecated from torch 2.13 in favour of a private module. gloo (CPU) and NCCL both implement it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all_to_all: chunk j of dim 0 goes to group rank j; chunk j of the result came from it."""
    if dist.get_world_size(group) == 1:
        return x
    if x.shape[0] % dist.get_world_size(group):
        raise ValueError(f"all_to_all needs dim 0 ({x.shape[0]}) divisible by the group size "
                         f"{dist.get_world_size(group)}")
    return _AllToAllEqual.apply(x, group)


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # all_reduce + slice rather than reduce_scatter: gloo implements the former everywhere.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all_gather: [B, ...] per rank -> [world * B, ...], rank-major. Equal B on every rank."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllGather.apply(x, group)


def is_expert_parameter(param: torch.Tensor) -> bool:
    return bool(getattr(param, EXPERT_PARALLEL_ATTR, False))


def allreduce_gradients(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Average gradients so every rank holds the gradient of the mean of all W ranks' losses.

    Call after each rank's `loss.backward()`, before the optimizer step. Non-expert gradients are summed over the
    whole world; expert gradients only over the expert-data-parallel group, because the all_to_all backward has
    already summed the contributions of the other ranks of the EP group. Both are then divided by the world size W
    (not by the group size): that is what makes them the gradient of mean_r loss_r. Parameters that need a
    gradient but got none are reduced as zeros, so all ranks issue the same collectives.
    """
    buckets: dict[tuple[bool, torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        buckets[(is_expert_parameter(param), param.grad.dtype, param.grad.device)].append(param.grad)
    # Sorted keys: every rank must issue the collectives in the same order.
    for (expert, _, _), grads in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per bucket, not one per tensor
        group = groups.expert_dp_group if expert else None
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat /= groups.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
