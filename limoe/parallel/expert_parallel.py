"""Expert parallelism in the training loop (the `ExpertParallel` strategy): swap MoE layers for EP shards; the
placement table says how each gradient is reduced and clipped.

Checkpoints are sharded (limoe.parallel.sharded_strategy): each rank writes its experts as a shard of the global
[E, ...] tensors, so a run resumes under any layout and `limoe.load_checkpoint` loads it in one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard

from limoe.moe.layer import MoeMlp
from limoe.moe.parallel import ExpertParallelMoeMlp, expert_state_keys, shard_state_dict
from limoe.parallel.mesh import ExpertParallelGroups, expert_parallel_groups
from limoe.parallel.placement import TensorPlacement
from limoe.parallel.sharded_strategy import ShardedStrategy


class ExpertParallel(ShardedStrategy):
    """Experts split over groups of `ep_size` ranks, everything else replicated.

    Gradients after the backward: a non-expert one is summed over the whole world; an expert one only over the
    "expert_dp" ranks that hold the same experts, because the all_to_all's backward has already summed the
    contributions of the other ranks of its EP group. Both are then divided by the world size W (not by the
    group's size): that makes them the gradient of the mean of all W ranks' losses.
    """

    def _split(self, model: nn.Module, mesh: DeviceMesh) -> None:
        self.groups = shard_model(model, self.ep_size, self.num_experts, mesh)

    def _placement(self, shape, value, expert, expert_mesh):
        world = self.world.size
        if expert:  # split over the EP ranks, the same on every "expert_dp" rank
            return TensorPlacement(shape, expert_mesh, (Shard(0), Replicate()), "expert_dp", world,
                                   copies=world // self.ep_size)
        return TensorPlacement(shape, grad_reduce_over="world", grad_divisor=world, copies=world)


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

