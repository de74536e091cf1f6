"""FSDP2 (`--set dist.fsdp=true`): parameters, gradients and AdamW states sharded over the ranks, composed with
expert parallelism the way torchtitan composes them.

On the run's one DeviceMesh (`limoe.parallel.mesh.device_mesh`, dims "expert_dp" x "ep"):
- experts are split over the "ep" ranks first (as `ExpertParallel` does), then each EP shard is sharded again
  by FSDP over the "expert_dp" ranks that hold the same experts;
- everything else is sharded by FSDP over all ranks, one FSDP unit per transformer block plus the root.
Gradients come out of the backward reduce-scattered; what is left (the experts' scale, the replicated 0-dim
parameters) is in the placement table. Checkpoints and evaluation work on the shards too
(limoe.parallel.sharded_strategy).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from limoe.model.block import Block
from limoe.moe.layer import MoeMlp
from limoe.parallel import expert_parallel as ep
from limoe.parallel.mesh import whole_mesh
from limoe.parallel.placement import TensorPlacement
from limoe.parallel.sharded_strategy import ShardedStrategy


class Fsdp(ShardedStrategy):
    def __init__(self, world, device: torch.device, ep_size: int, num_experts: int):
        super().__init__(world, device, ep_size, num_experts)
        self.root: nn.Module | None = None

    def _split(self, model: nn.Module, mesh: DeviceMesh) -> None:
        if self.ep_size > 1:
            self.groups = ep.shard_model(model, self.ep_size, self.num_experts, mesh)
            for layer in (m for m in model.modules() if isinstance(m, MoeMlp)):
                fully_shard(layer.experts, mesh=mesh["expert_dp"])
        # FSDP2 cannot shard 0-dim tensors (the logit scale and bias, Soft MoE's router scale): they stay
        # replicated, and their placement has them averaged after the backward.
        everyone, ignored = whole_mesh(mesh), {p for p in model.parameters() if p.dim() == 0}
        for block in (m for m in model.modules() if isinstance(m, Block)):
            fully_shard(block, mesh=everyone, ignored_params=ignored)
            register_fsdp_forward_method(block, "forward_pair")  # one-tower training calls this, not forward
        fully_shard(model, mesh=everyone, ignored_params=ignored)
        for method in ("encode_image", "encode_text"):  # what evaluation calls
            register_fsdp_forward_method(model, method)
        self.root = model
        # FSDP2 warns that blocks return views (the pair's image and text halves), in case a caller modifies them
        # in place: nothing does, and the equivalence tests would catch wrong gradients if it did.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")

    def _placement(self, shape, value, expert, expert_mesh):
        if expert and self.groups is not None:
            # Split over the EP ranks, then FSDP's chunks over the "expert_dp" ranks. FSDP averaged the gradient
            # over the W/P "expert_dp" ranks, but the EP exchange's backward had already summed it over the P ranks
            # of the EP group: it is P times the mean's. (A divide factor of W in FSDP would do it in one go, but
            # gloo lacks the reduce op it needs.)
            return TensorPlacement(shape, expert_mesh, (Shard(0), Shard(0)), grad_divisor=self.ep_size)
        if isinstance(value, DTensor):  # FSDP's shard: its gradient comes out of the backward reduce-scattered
            return TensorPlacement(shape, value.device_mesh, tuple(value.placements))
        world = self.world.size  # left replicated: averaged by hand
        return TensorPlacement(shape, grad_reduce_over="world", grad_divisor=world, copies=world)

    def accumulating(self, runner: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
