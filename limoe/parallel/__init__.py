"""Parallelism: how the ranks of a run share the model, in one package.

Modules, from the bottom up:
- `world.py`: this process in the torchrun process group (`World`, `init`, `barrier`, `any_flag`, `shutdown`);
- `mesh.py`: the run's DeviceMesh, dims ("expert_dp", "ep"), and this rank's expert-parallel groups;
- `collectives.py`: the differentiable all_to_all and all_gather the model's own layers call;
- `strategy.py`: the `Strategy` interface the training loop calls, for one process and for DDP;
- `placement.py`: the table of where each tensor of a sharded model lives, and what its gradient needs;
- `sharded_strategy.py`, `expert_parallel.py`, `fsdp.py`: the strategies whose ranks hold parts of the model;
- `materialise.py`: a model built shard by shard, never whole on any rank.

`world`, `mesh` and `collectives` import nothing of limoe (the MoE layer's expert-parallel form and the
contrastive loss use them); the strategies build on the model, the MoE layer and checkpoints. The entry points
are `make_strategy` here and `build_for` in `materialise.py`.
"""

from __future__ import annotations

import torch

from limoe.parallel.strategy import DataParallel, Strategy
from limoe.parallel.world import World


def make_strategy(cfg, world: World, device: torch.device) -> Strategy:
    """The strategy `cfg.dist` asks for on this world."""
    if world.size == 1:  # nothing to share: FSDP or expert parallelism over one rank is the model as built
        return Strategy(world, device)
    model = cfg.model_config()
    experts = model.moe_config().num_experts if model.moe_layer_ids else 0
    if cfg.dist.fsdp:
        from limoe.parallel.fsdp import Fsdp

        return Fsdp(world, device, cfg.dist.expert_parallel, experts)
    if cfg.dist.expert_parallel > 1:
        from limoe.parallel.expert_parallel import ExpertParallel

        return ExpertParallel(world, device, cfg.dist.expert_parallel, experts)
    return DataParallel(world, device)
