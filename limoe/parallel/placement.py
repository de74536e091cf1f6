"""Where each tensor of a sharded model lives: a table with one entry per state-dict name, written once by the
strategy that shards the model (limoe.parallel.sharded_strategy) and read by everything that depends on the layout.

- Checkpoints: `global_view` shows this rank's tensor as its share of the single-process tensor (a DTensor that DCP
  writes and reshards); `cut` takes this rank's share of a single-process tensor.
- The optimizer step: `reduce_gradients` does what the backward left undone of the gradient reduction, one
  all_reduce per (group, divisor) bucket; `clip_grad_norm` clips the norm of the whole model with one all_reduce
  and no host sync.

An entry states where the elements are in DTensor's words (Shard, Replicate on a DeviceMesh) and adds what a DTensor
cannot say: what the gradient still needs after the backward, and how many ranks hold each of its elements.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor


@dataclass(frozen=True)
class TensorPlacement:
    """One tensor of the model (a parameter or buffer, and a parameter's gradient and AdamW moments)."""

    shape: torch.Size  # its shape in one process
    mesh: DeviceMesh | None = None  # None: a plain tensor, whole and the same on every rank
    placements: tuple[Placement, ...] = ()  # how it lies on `mesh`, one per mesh dim
    # After the backward, the gradient is summed over this group of `Placements.groups` (None: no collective),
    # then divided by `grad_divisor`: the two together turn it into the gradient of the mean of every rank's loss.
    grad_reduce_over: str | None = None
    grad_divisor: int = 1
    copies: int = 1  # how many ranks hold each element of the gradient: the global norm counts each element once


class Placements:
    """The table: `entries` by state-dict name; `groups` the process groups `grad_reduce_over` names."""

    def __init__(self, entries: dict[str, TensorPlacement], groups: dict[str, dist.ProcessGroup | None]):
        self.entries, self.groups = entries, groups

    def __getitem__(self, name: str) -> TensorPlacement:
        return self.entries[name]

    def cut(self, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's share of `full`, the single-process value of tensor `name`, in the form of `like` (this
        rank's tensor `name`: a plain tensor or a DTensor), on its device and with its dtype."""
        entry = self.entries[name]
        full = full.to(local(like).device, like.dtype)
        if entry.mesh is None or full.dim() == 0:
            return full
        part = distribute_tensor(full, entry.mesh, list(entry.placements), src_data_rank=None).to_local()
        if isinstance(like, DTensor):  # FSDP's: the same part, on the mesh FSDP shards it over
            return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                      stride=like.stride())
        return part

    def global_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t`, this rank's tensor `name` (or a gradient or AdamW moment of it), as its share of the single-process
        tensor: a DTensor of the global shape, or `t` itself where it is whole on every rank."""
        entry = self.entries[name]
        if entry.mesh is None or t.dim() == 0:  # 0-dim: AdamW's step count, the same on every rank
            return t
        if isinstance(t, DTensor) and t.device_mesh == entry.mesh and tuple(t.placements) == entry.placements:
            return t
        stride = tuple(math.prod(entry.shape[i + 1:]) for i in range(len(entry.shape)))  # contiguous
        return DTensor.from_local(local(t), entry.mesh, list(entry.placements), run_check=False,
                                  shape=entry.shape, stride=stride)

    def reduce_gradients(self, model: nn.Module) -> None:
        """Finish the gradient reduction the backward began, as each entry says. Gradients of the same group,
        divisor, dtype and device go in one collective. A parameter that needs a reduction but got no gradient
        takes part with zeros, so every rank issues the same collectives."""
        buckets: dict[tuple[str, int, str, str], list[torch.Tensor]] = defaultdict(list)
        for name, param in model.named_parameters():
            entry = self.entries[name]
            if not param.requires_grad or (entry.grad_reduce_over is None and entry.grad_divisor == 1):
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = local(param.grad)
            buckets[(entry.grad_reduce_over or "", entry.grad_divisor, str(grad.dtype), str(grad.device))].append(grad)
        for (over, divisor, _, _), grads in sorted(buckets.items()):  # sorted: the same order on every rank
            flat = torch.cat([g.reshape(-1) for g in grads])
            group = self.groups[over] if over else None
            if over and dist.get_world_size(group) > 1:
                dist.all_reduce(flat, group=group)
            flat /= divisor
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def clip_grad_norm(self, model: nn.Module, max_norm: float, device: torch.device) -> torch.Tensor:
        """Clip the gradient norm of the whole, unsharded model, as `clip_grad_norm_` does in one process; returns
        the norm before clipping. Each rank adds its squares, each divided by its element's number of copies; one
        all_reduce over the world sums them."""
        by_copies: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        grads = []
        for name, param in model.named_parameters():
            if param.grad is not None:
                grad = local(param.grad)
                by_copies[self.entries[name].copies] += grad.detach().float().pow(2).sum().to(device)
                grads.append(grad)
        squares = torch.zeros((), device=device)
        for copies, summed in by_copies.items():  # one division per kind of tensor, not per parameter
            squares += summed / copies
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(squares)
        total = squares.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coef.to(grad.dtype))
        return total


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: a DTensor's local tensor, or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t
