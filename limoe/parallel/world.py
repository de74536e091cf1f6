"""Process groups under torchrun: gloo on CPU, NCCL on CUDA; a no-op for a single process."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when this module created the process group (and must destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device_type: str) -> World:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1) and not already joined."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def any_flag(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if any rank raised the flag (a signal must stop all ranks at the same step)."""
    if world.size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown(world: World) -> None:
    """After a run: collect what holds the process group, and leave it if this module joined it."""
    if world.size > 1 and dist.is_initialized():
        # DDP's reducer sits in reference cycles: collected after the group is destroyed (here, or by a caller
        # that made the group itself), its destructor can abort the process (SIGABRT), so collect it while the
        # group is alive.
        gc.collect()
    if world.owns_group and dist.is_initialized():
        # Leave together: a rank tearing down gloo while a peer still talks to it can abort the peer.
        dist.barrier()
        dist.destroy_process_group()
