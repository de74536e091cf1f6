"""Expert parallelism in the training loop (the `ExpertParallel` strategy): swap MoE layers for EP shards, reduce
and clip gradients, and move model / optimizer state between EP shards and the single-process layout that
checkpoints use.

Checkpoints always hold the single-process layout (full expert tensors, and full AdamW moments for them), so a
run can resume with any expert-parallel size, and `limoe.load_checkpoint` loads it in one process.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from limoe import checkpoint as ckpt
from limoe import checkpoint_sharded as sharded
from limoe.distributed import (ExpertParallelGroups, allreduce_gradients, device_mesh, expert_parallel_groups,
                               is_expert_parameter)
from limoe.moe.layer import MoeMlp
from limoe.moe.parallel import ExpertParallelMoeMlp, expert_state_keys, gather_full_state_dict, shard_state_dict
from limoe.train.strategy import Strategy


class ExpertParallel(Strategy):
    """Experts split over groups of `ep_size` ranks, everything else replicated: gradients are reduced after the
    backward (`allreduce_gradients`, expert ones only over the ranks holding the same experts)."""

    def __init__(self, world, device: torch.device, ep_size: int, num_experts: int):
        super().__init__(world, device)
        self.ep_size, self.num_experts = ep_size, num_experts
        self.groups: ExpertParallelGroups | None = None

    def shard(self, model: nn.Module) -> None:
        self.groups = shard_model(model, self.ep_size, self.num_experts, device_mesh(self.ep_size, self.device.type))

    def reduce_gradients(self, model: nn.Module) -> None:
        allreduce_gradients(model, self.groups)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.tensor(clip_grad_norm(model, max_norm, self.groups), device=self.device)

    def full_state(self, model, optimizer):
        weights = gather_full_state_dict(model, self.groups)
        if optimizer is None:
            return weights, None
        return weights, gather_optimizer_tensors(optimizer, ckpt.optimizer_state(optimizer)[0], self.groups)

    def load_full_state(self, model, optimizer, checkpoint, opt_tensors, opt_meta) -> None:
        full, opt_tensors = sharded.full_tensors(checkpoint, opt_tensors)
        weights = shard_state_dict(full, expert_state_keys(model), self.groups.ep_rank, self.groups.ep_size)
        ckpt.load_weights(model, checkpoint, weights)
        ckpt.load_optimizer_state(optimizer, shard_optimizer_tensors(optimizer, opt_tensors, self.groups), opt_meta)

    def eval_model(self, model, build):
        # An EP layer needs its whole EP group, but only rank 0 evaluates: it evaluates a single-process copy.
        return self._whole_copy(model, build)


def shard_model(model: nn.Module, ep_size: int, num_experts: int, mesh=None) -> ExpertParallelGroups:
    """Create the EP groups (of `mesh`; collective) and replace every `MoeMlp` of `model` by this rank's EP shard of it.

    The full model is built first on every rank (same seed, so all ranks agree) and each layer is sliced with
    `shard_state_dict`: simple, and cheap at the sizes that train on one machine. For models whose experts do
    not fit on one device, construct `ExpertParallelMoeMlp` layers directly and load a checkpoint into them.
    The global RNG streams are left as they were, so data and router noise draw the same numbers as a
    data-parallel run with the same seed.
    """
    groups = expert_parallel_groups(ep_size, num_experts, mesh)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is MoeMlp]
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        for parent, name, layer in targets:
            shard = ExpertParallelMoeMlp(layer.config, groups)
            param = next(layer.parameters())
            shard.to(device=param.device, dtype=param.dtype)
            shard.load_state_dict(shard_state_dict(layer.state_dict(), expert_state_keys(layer), groups.ep_rank,
                                                   groups.ep_size))
            shard.train(layer.training)
            setattr(parent, name, shard)
    return groups


def clip_grad_norm(model: nn.Module, max_norm: float, groups: ExpertParallelGroups) -> float:
    """`clip_grad_norm_` over the whole (unsharded) model: expert gradients' squares are summed over the EP
    group, replicated gradients counted once. Returns the total norm before clipping, as torch's does."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expert = [p.grad for p in model.parameters() if p.grad is not None and is_expert_parameter(p)]
    replicated_sq = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros(()))
    expert_sq = sum((g.detach().float().pow(2).sum() for g in expert), torch.zeros(()))
    replicated_sq = replicated_sq - expert_sq
    if groups.ep_size > 1:
        expert_sq = expert_sq.to(grads[0].device if grads else "cpu")
        dist.all_reduce(expert_sq, group=groups.ep_group)
    total = math.sqrt(float(replicated_sq) + float(expert_sq))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def _expert_indices(optimizer: torch.optim.Optimizer) -> set[int]:
    """Indices (as in `optimizer.state_dict()`) of the expert-sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i for i, p in enumerate(params) if is_expert_parameter(p)}


def _is_shard(name: str, value: torch.Tensor) -> bool:
    return name != "step" and value.dim() >= 1


def gather_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                             groups: ExpertParallelGroups) -> dict[str, torch.Tensor]:
    """Optimizer tensors ("state.<idx>.<name>") with expert shards all-gathered into full tensors. Collective."""
    expert = _expert_indices(optimizer)
    out = dict(tensors)
    for key in sorted(tensors):  # the same order on every rank
        _, idx, name = key.split(".", 2)
        if int(idx) in expert and _is_shard(name, tensors[key]):
            shard = tensors[key].contiguous()
            parts = [torch.empty_like(shard) for _ in range(groups.ep_size)]
            dist.all_gather(parts, shard, group=groups.ep_group)
            out[key] = torch.cat(parts)
    return out


def shard_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                            groups: ExpertParallelGroups) -> dict[str, torch.Tensor]:
    """The inverse of `gather_optimizer_tensors`: this rank's slice of full expert moments."""
    expert = _expert_indices(optimizer)
    out = dict(tensors)
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        if int(idx) in expert and _is_shard(name, value):
            per_rank = value.shape[0] // groups.ep_size
            out[key] = value[groups.ep_rank * per_rank:(groups.ep_rank + 1) * per_rank]
    return out
