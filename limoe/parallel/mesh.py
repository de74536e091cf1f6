"""The device mesh of expert parallelism (EP) composed with data parallelism, and this rank's place in it.

With world size W and EP size P (W a multiple of P), ranks [0..P-1], [P..2P-1], ... form the EP groups: each
group holds all E experts, E/P per rank, and exchanges tokens inside itself. Ranks holding the same expert shard
(same rank modulo P) form the expert-data-parallel groups, W/P ranks each. Non-expert parameters are replicated
on all W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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
