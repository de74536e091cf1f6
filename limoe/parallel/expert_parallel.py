"""Expert parallelism in the training loop (the `ExpertParallel` strategy): swap MoE layers for EP shards, reduce
gradients (`allreduce_gradients`) and clip them.

Checkpoints are sharded (limoe.parallel.sharded_strategy): each rank writes its experts as a shard of the global
[E, ...] tensors, so a run resumes under any layout and `limoe.load_checkpoint` loads it in one process.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from limoe.moe.layer import MoeMlp
from limoe.moe.parallel import ExpertParallelMoeMlp, expert_state_keys, shard_state_dict
from limoe.parallel.mesh import ExpertParallelGroups, device_mesh, expert_parallel_groups
from limoe.parallel.sharded_strategy import ShardedStrategy


class ExpertParallel(ShardedStrategy):
    """Experts split over groups of `ep_size` ranks, everything else replicated: gradients are reduced after the
    backward (`allreduce_gradients`, expert ones only over the ranks holding the same experts)."""

    def shard(self, model: nn.Module) -> None:
        mesh = device_mesh(self.ep_size, self.device.type)
        self._set_expert_mesh(mesh)
        self.groups = shard_model(model, self.ep_size, self.num_experts, mesh)
        self._name_experts(model)

    def expert_placements(self):
        return [Shard(0), Replicate()]  # split over the EP ranks, the same on every "expert_dp" rank

    def reduce_gradients(self, model: nn.Module) -> None:
        allreduce_gradients(model, self.groups, self.expert_names)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # Expert gradients are split over the EP group (each is the same on its "expert_dp" replicas).
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        return self.clip_sharded([p for _, p in named], [n in self.expert_names for n, _ in named], max_norm,
                                 self.groups.ep_group)


def shard_model(model: nn.Module, ep_size: int, num_experts: int, mesh=None) -> ExpertParallelGroups:
    """Create the EP groups (of `mesh`; collective) and replace every `MoeMlp` of `model` by this rank's EP shard of it.

    A model on the meta device (the training loop's, limoe.parallel.materialise) gets meta shards, filled later;
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


def allreduce_gradients(model: nn.Module, groups: ExpertParallelGroups,
                        expert_names: frozenset[str] | None = None) -> None:
    """Average gradients so every rank holds the gradient of the mean of all W ranks' losses.

    Call after each rank's `loss.backward()`, before the optimizer step. Non-expert gradients are summed over the
    whole world; expert gradients only over the expert-data-parallel group, because the all_to_all backward has
    already summed the contributions of the other ranks of the EP group. Both are then divided by the world size W
    (not by the group size): that is what makes them the gradient of mean_r loss_r. Parameters that need a
    gradient but got none are reduced as zeros, so all ranks issue the same collectives. `expert_names`: the
    expert tensors' names (`expert_state_keys(model)`, looked up when not given).
    """
    buckets: dict[tuple[bool, torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
    experts = expert_names if expert_names is not None else set(expert_state_keys(model))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        buckets[(name in experts, param.grad.dtype, param.grad.device)].append(param.grad)
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
