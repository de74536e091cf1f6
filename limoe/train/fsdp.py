"""FSDP2 (`--set dist.fsdp=true`): parameters, gradients and AdamW states sharded over the ranks, composed with
expert parallelism the way torchtitan composes them.

On the run's one DeviceMesh (`limoe.distributed.device_mesh`, dims "expert_dp" x "ep"):
- experts are split over the "ep" ranks first (as `ExpertParallel` does), then each EP shard is sharded again
  by FSDP over the "expert_dp" ranks that hold the same experts;
- everything else is sharded by FSDP over all ranks, one FSDP unit per transformer block plus the root.
Gradients come out of the backward reduce-scattered: nothing to reduce after it. Checkpoints still hold the
single-process layout (gathered here, written by rank 0).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from limoe import checkpoint as ckpt
from limoe.distributed import EXPERT_PARALLEL_ATTR, ExpertParallelGroups, device_mesh, whole_mesh
from limoe.model.block import Block
from limoe.moe.layer import MoeMlp
from limoe.moe.parallel import expert_state_keys, gather_full_state_dict, shard_state_dict
from limoe.train import expert_parallel as ep
from limoe.train.strategy import Strategy


class Fsdp(Strategy):
    def __init__(self, world, device: torch.device, ep_size: int, num_experts: int):
        super().__init__(world, device)
        self.ep_size, self.num_experts = ep_size, num_experts
        self.groups: ExpertParallelGroups | None = None
        self.root: nn.Module | None = None
        self.replicated: list[nn.Parameter] = []
        self.experts: list[nn.Parameter] = []

    def shard(self, model: nn.Module) -> None:
        mesh = device_mesh(self.ep_size, self.device.type)
        if self.ep_size > 1:
            self.groups = ep.shard_model(model, self.ep_size, self.num_experts, mesh)
            for layer in (m for m in model.modules() if isinstance(m, MoeMlp)):
                fully_shard(layer.experts, mesh=mesh["expert_dp"])
                for param in layer.experts.parameters():  # the sharded parameters are new objects
                    setattr(param, EXPERT_PARALLEL_ATTR, True)
                    self.experts.append(param)
        # FSDP2 cannot shard 0-dim tensors (the logit scale and bias, Soft MoE's router scale): they stay
        # replicated and are averaged by hand.
        self.replicated = [p for p in model.parameters() if p.dim() == 0]
        everyone, ignored = whole_mesh(mesh), set(self.replicated)
        for block in (m for m in model.modules() if isinstance(m, Block)):
            fully_shard(block, mesh=everyone, ignored_params=ignored)
            register_fsdp_forward_method(block, "forward_pair")  # one-tower training calls this, not forward
        fully_shard(model, mesh=everyone, ignored_params=ignored)
        self.root = model

    def accumulating(self, runner: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        # FSDP averaged the expert gradients over the W/P "expert_dp" ranks, but the EP exchange's backward had
        # already summed them over the P ranks of the EP group: they are P times the mean's. (A divide factor of
        # W in FSDP would do the same in one go, but gloo lacks the reduce op it needs.)
        for param in self.experts:
            if param.grad is not None:
                _local(param.grad).div_(self.ep_size)
        for param in self.replicated:
            if param.grad is None:  # every rank must take part in every reduction
                param.grad = torch.zeros_like(param)
        if self.replicated:
            flat = torch.stack([p.grad for p in self.replicated])
            dist.all_reduce(flat)
            for param, grad in zip(self.replicated, flat / self.world.size):
                param.grad.copy_(grad)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # Every sharded gradient element lives on exactly one rank (FSDP shards, EP shards of distinct experts):
        # their squared norm is the sum over ranks of the local squares. Replicated ones count once.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        square = sum((_local(g).detach().float().pow(2).sum() for g in grads if isinstance(g, DTensor)),
                     torch.zeros((), device=self.device))
        dist.all_reduce(square)
        square += sum((g.detach().float().pow(2).sum() for g in grads if not isinstance(g, DTensor)),
                      torch.zeros((), device=self.device))
        total = square.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(coef.to(g.dtype))
        return total

    def full_state(self, model, optimizer):
        # Collective: every rank gathers in the same (sorted) order.
        weights = {k: _full(v) for k, v in model.state_dict().items()}
        if self.groups is not None:
            weights = gather_full_state_dict(model, self.groups, weights)
        if optimizer is None:
            return weights, None
        tensors, _ = ckpt.optimizer_state(optimizer)
        tensors = {k: _full(tensors[k]) for k in sorted(tensors)}
        if self.groups is not None:
            tensors = ep.gather_optimizer_tensors(optimizer, tensors, self.groups)
        return weights, tensors

    def load_full_state(self, model, optimizer, checkpoint, opt_tensors, opt_meta) -> None:
        weights = ckpt.checked_weights(model, checkpoint)
        if self.groups is not None:
            weights = shard_state_dict(weights, expert_state_keys(model), self.groups.ep_rank, self.groups.ep_size)
        own = model.state_dict()
        model.load_state_dict({k: _like(v, own[k]) for k, v in weights.items()})
        if self.groups is not None:
            opt_tensors = ep.shard_optimizer_tensors(optimizer, opt_tensors, self.groups)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        placed = {}
        for key, value in opt_tensors.items():
            if key.startswith("state.") and value.dim() >= 1:  # not AdamW's step count
                value = _like(value, params[int(key.split(".")[1])])
            placed[key] = value
        ckpt.load_optimizer_state(optimizer, placed, opt_meta)

    def eval_model(self, model, build):
        return self._whole_copy(model, build)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` placed as `target` is (this rank's shard when target is a DTensor); every rank holds `full`."""
    if not isinstance(target, DTensor):
        return full
    return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
