"""FSDP2 (`--set dist.fsdp=true`): parameters, gradients and AdamW states sharded over the ranks, composed with
expert parallelism the way torchtitan composes them.

On the run's one DeviceMesh (`limoe.parallel.mesh.device_mesh`, dims "expert_dp" x "ep"):
- experts are split over the "ep" ranks first (as `ExpertParallel` does), then each EP shard is sharded again
  by FSDP over the "expert_dp" ranks that hold the same experts;
- everything else is sharded by FSDP over all ranks, one FSDP unit per transformer block plus the root.
Gradients come out of the backward reduce-scattered: nothing to reduce after it. Checkpoints and evaluation
work on the shards too (limoe.parallel.sharded_strategy).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from limoe.model.block import Block
from limoe.moe.layer import MoeMlp
from limoe.parallel import expert_parallel as ep
from limoe.parallel.mesh import device_mesh, whole_mesh
from limoe.parallel.sharded_strategy import ShardedStrategy
from limoe.parallel.sharded_strategy import local as _local


class Fsdp(ShardedStrategy):
    def __init__(self, world, device: torch.device, ep_size: int, num_experts: int):
        super().__init__(world, device, ep_size, num_experts)
        self.root: nn.Module | None = None

    def shard(self, model: nn.Module) -> None:
        mesh = device_mesh(self.ep_size, self.device.type)
        if self.ep_size > 1:
            self._set_expert_mesh(mesh)
            self.groups = ep.shard_model(model, self.ep_size, self.num_experts, mesh)
            for layer in (m for m in model.modules() if isinstance(m, MoeMlp)):
                fully_shard(layer.experts, mesh=mesh["expert_dp"])
        self._name_experts(model)
        # FSDP2 cannot shard 0-dim tensors (the logit scale and bias, Soft MoE's router scale): they stay
        # replicated and are averaged by hand.
        everyone, ignored = whole_mesh(mesh), set(_replicated(model))
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

    def accumulating(self, runner: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        # FSDP averaged the expert gradients over the W/P "expert_dp" ranks, but the EP exchange's backward had
        # already summed them over the P ranks of the EP group: they are P times the mean's. (A divide factor of
        # W in FSDP would do the same in one go, but gloo lacks the reduce op it needs.)
        for name, param in model.named_parameters():
            if name in self.expert_names and param.grad is not None:
                _local(param.grad).div_(self.ep_size)
        replicated = _replicated(model)  # looked up each time: materialising the model made new parameters
        for param in replicated:
            if param.grad is None:  # every rank must take part in every reduction
                param.grad = torch.zeros_like(param)
        if replicated:
            flat = torch.stack([p.grad for p in replicated])
            dist.all_reduce(flat)
            for param, grad in zip(replicated, flat / self.world.size):
                param.grad.copy_(grad)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # Every DTensor gradient element lives on exactly one rank (FSDP shards, EP shards of distinct experts);
        # the 0-dim replicated ones are the same everywhere.
        params = [p for p in model.parameters() if p.grad is not None]
        return self.clip_sharded(params, [isinstance(p.grad, DTensor) for p in params], max_norm, None)

    # -- checkpoints (sharded: limoe.parallel.sharded_strategy) ----------------------------------------------
    def expert_placements(self):
        return [Shard(0), Shard(0)]  # split over the EP ranks, then FSDP's chunks over the "expert_dp" ranks


def _replicated(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() == 0]
