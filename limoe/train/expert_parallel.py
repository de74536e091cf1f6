"""Expert parallelism in the training loop (the `ExpertParallel` strategy): swap MoE layers for EP shards, reduce
and clip gradients.

Checkpoints are sharded (limoe.train.sharded): each rank writes its experts as a shard of the global [E, ...]
tensors, so a run resumes under any layout and `limoe.load_checkpoint` loads it in one process.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from limoe.distributed import (ExpertParallelGroups, allreduce_gradients, device_mesh, expert_parallel_groups,
                               is_expert_parameter)
from limoe.moe.layer import MoeMlp
from limoe.moe.parallel import ExpertParallelMoeMlp, expert_state_keys, shard_state_dict
from limoe.train.sharded import ShardedStrategy


class ExpertParallel(ShardedStrategy):
    """Experts split over groups of `ep_size` ranks, everything else replicated: gradients are reduced after the
    backward (`allreduce_gradients`, expert ones only over the ranks holding the same experts)."""

    def shard(self, model: nn.Module) -> None:
        mesh = device_mesh(self.ep_size, self.device.type)
        self._set_expert_mesh(mesh)
        self.groups = shard_model(model, self.ep_size, self.num_experts, mesh)

    def expert_placements(self):
        return [Shard(0), Replicate()]  # split over the EP ranks, the same on every "expert_dp" rank

    def reduce_gradients(self, model: nn.Module) -> None:
        allreduce_gradients(model, self.groups)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.tensor(clip_grad_norm(model, max_norm, self.groups), device=self.device)


def shard_model(model: nn.Module, ep_size: int, num_experts: int, mesh=None) -> ExpertParallelGroups:
    """Create the EP groups (of `mesh`; collective) and replace every `MoeMlp` of `model` by this rank's EP shard of it.

    A model on the meta device (the training loop's, limoe.train.materialise) gets meta shards, filled later;
    a real model's layers are sliced with `shard_state_dict`. The global RNG streams are left as they were, so
    data and router noise draw the same numbers as a data-parallel run with the same seed.
    """
    groups = expert_parallel_groups(ep_size, num_experts, mesh)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is MoeMlp]
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        for parent, name, layer in targets:
            param = next(layer.parameters())
            with torch.device(param.device):
                shard = ExpertParallelMoeMlp(layer.config, groups)
            shard.to(dtype=param.dtype)
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
