"""Differentiable collectives of the model's own layers: the expert-parallel token exchange (all_to_all) and the
contrastive loss's gathering of every rank's embeddings (all_gather). gloo (CPU) and NCCL both implement them."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
