"""Expert-parallel MoE layer and portable (EP-size independent) checkpoints.

Each rank routes its own S tokens exactly like `MoeMlp` (same capacity C from its local S), so a rank's output
equals `MoeMlp` with the full expert set applied to that rank's tokens. Only the experts are sharded: the
dispatcher's [E, C, d] capacity buffer is exchanged with one all_to_all, each rank runs its e experts (E over the
r ranks of its EP group) on [e, r*C, d], and a second all_to_all sends the results back. Buffers have fixed
capacity, so all splits are equal and no sizes are exchanged. Every rank of an EP group must therefore call the
layer with the same number of tokens (pad with valid=False).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from limoe.moe.config import MoeConfig
from limoe.moe.dispatch import Dispatcher
from limoe.moe.experts import ExpertMlps
from limoe.moe.layer import MoeMlp
from limoe.parallel.collectives import all_to_all
from limoe.parallel.mesh import ExpertParallelGroups, check_expert_parallel


class ExpertParallelDispatcher(Dispatcher):
    """The padded layout, with this rank's buffers of every expert exchanged for every rank's buffers of its own
    experts (`groups.local_experts(E)`). Padded only: the exchange needs equal splits, so no sizes to send."""

    def __init__(self, groups: ExpertParallelGroups):
        super().__init__("bmm")
        self.groups = groups

    def run_experts(self, experts: ExpertMlps, x_ECd: torch.Tensor) -> torch.Tensor:
        num_experts, cap, dim = x_ECd.shape
        ep = self.groups.ep_size
        local = num_experts // ep
        # Dim 0 is expert-major, so chunk j (experts of EP rank j) goes to rank j; we receive, from each rank j,
        # its C rows for each of our experts: [r, e, C, d] -> per expert, all ranks' rows side by side (R = r*C).
        recv_reCd = all_to_all(x_ECd, self.groups.ep_group).view(ep, local, cap, dim)
        x_eRd = recv_reCd.transpose(0, 1).reshape(local, ep * cap, dim)
        y_eRd = experts(x_eRd)
        send_reCd = y_eRd.view(local, ep, cap, dim).transpose(0, 1)
        return all_to_all(send_reCd.reshape(num_experts, cap, dim), self.groups.ep_group)


class ExpertParallelMoeMlp(MoeMlp):
    """`MoeMlp` whose experts are split over `groups.ep_group`; this rank holds `groups.local_experts(E)`.

    State-dict keys equal MoeMlp's; expert tensors hold this rank's shard along dim 0 (see `shard_state_dict`);
    which parameters are experts' is known by these names (`expert_state_keys`). Initialisation: the router draws
    from the global RNG as usual (same seed on every rank gives the same router); the local experts draw from a
    generator seeded with (torch.initial_seed(), ep_rank), so shards differ across an EP group and agree across
    its replicas.
    """

    def __init__(self, config: MoeConfig, groups: ExpertParallelGroups):
        check_expert_parallel(groups.ep_size, groups.world_size, config.num_experts)
        if config.expert_backend == "grouped_mm":
            raise ValueError("expert_backend='grouped_mm' does not combine with expert parallelism (its all_to_all "
                             "exchanges capacity-padded [E, C, d] buffers); use 'auto' or 'bmm'")
        if config.capacity_tokens != "all":
            raise ValueError("capacity_tokens='valid' does not combine with expert parallelism (every rank of an "
                             "expert group must use the same capacity); use 'all'")
        if groups.ep_group is not None and dist.get_world_size(groups.ep_group) != groups.ep_size:
            raise ValueError(f"ep_group has {dist.get_world_size(groups.ep_group)} ranks, expected {groups.ep_size}")
        # Fork (and restore) every RNG manual_seed touches: the global streams stay as they were for the router.
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed((torch.initial_seed() * 1009 + groups.ep_rank) % 2**63)
            experts = ExpertMlps(config.num_experts // groups.ep_size, config.dim, config.hidden_dim)
        super().__init__(config, experts=experts, dispatcher=ExpertParallelDispatcher(groups))
        self.groups = groups


# -- portable checkpoints ---------------------------------------------------------------------------------------
def expert_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of expert tensors (stacked along dim 0 by expert) of every MoE layer, EP or not."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, MoeMlp):
            prefix = f"{name}.experts." if name else "experts."
            keys += [prefix + key for key in module.experts.state_dict()]
    return keys


def shard_state_dict(full: dict[str, torch.Tensor], expert_keys: list[str], ep_rank: int,
                     ep_size: int) -> dict[str, torch.Tensor]:
    """Slice a single-process state dict for EP rank `ep_rank` of `ep_size` (expert tensors only; the rest as is)."""
    out = dict(full)
    for key in expert_keys:
        if key not in full:
            raise ValueError(f"state dict has no expert tensor {key!r}")
        num_experts = full[key].shape[0]
        if num_experts % ep_size:
            raise ValueError(f"{key}: {num_experts} experts are not divisible by the expert-parallel size {ep_size}")
        per_rank = num_experts // ep_size
        out[key] = full[key][ep_rank * per_rank:(ep_rank + 1) * per_rank]
    return out


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], groups: ExpertParallelGroups) -> None:
    """Load a single-process state dict (any EP size wrote it, once merged) into this rank's shard of `model`."""
    model.load_state_dict(shard_state_dict(full, expert_state_keys(model), groups.ep_rank, groups.ep_size))
