"""FSDP2 (`--set dist.fsdp=true`): parameters, gradients and AdamW states sharded over the ranks, composed with
expert parallelism the way torchtitan composes them.

On the run's one DeviceMesh (`limoe.distributed.device_mesh`, dims "expert_dp" x "ep"):
- experts are split over the "ep" ranks first (as `ExpertParallel` does), then each EP shard is sharded again
  by FSDP over the "expert_dp" ranks that hold the same experts;
- everything else is sharded by FSDP over all ranks, one FSDP unit per transformer block plus the root.
Gradients come out of the backward reduce-scattered: nothing to reduce after it. Checkpoints are sharded: every
rank writes its shards (limoe.checkpoint_sharded), experts as shards of the global [E, ...] tensors, so a
checkpoint loads under any layout. Evaluation still runs on a whole copy of the weights gathered for rank 0.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from limoe import checkpoint as ckpt
from limoe import checkpoint_sharded as sharded
from limoe.distributed import (EXPERT_PARALLEL_ATTR, ExpertParallelGroups, device_mesh, is_expert_parameter,
                               whole_mesh)
from limoe.model.block import Block
from limoe.moe.layer import MoeMlp
from limoe.moe.parallel import expert_state_keys, gather_full_state_dict, shard_state_dict
from limoe.train import expert_parallel as ep
from limoe.train.strategy import Strategy


class Fsdp(Strategy):
    def __init__(self, world, device: torch.device, ep_size: int, num_experts: int):
        super().__init__(world, device)
        self.ep_size, self.num_experts = ep_size, num_experts
        self.groups: ExpertParallelGroups | None = None
        self.root: nn.Module | None = None
        self.replicated: list[nn.Parameter] = []
        self.experts: list[nn.Parameter] = []
        self.expert_mesh: DeviceMesh | None = None

    def shard(self, model: nn.Module) -> None:
        mesh = device_mesh(self.ep_size, self.device.type)
        if self.ep_size > 1:
            # The same ranks as ("ep", "expert_dp"): an expert shard's rows sit at EP rank x E/P + its FSDP chunk,
            # i.e. [Shard(0), Shard(0)] in this order of the dims (checkpoints store the global layout).
            self.expert_mesh = DeviceMesh(self.device.type, mesh.mesh.transpose(0, 1),
                                          mesh_dim_names=("ep", "expert_dp"))
            self.groups = ep.shard_model(model, self.ep_size, self.num_experts, mesh)
            for layer in (m for m in model.modules() if isinstance(m, MoeMlp)):
                fully_shard(layer.experts, mesh=mesh["expert_dp"])
                for param in layer.experts.parameters():  # the sharded parameters are new objects
                    setattr(param, EXPERT_PARALLEL_ATTR, True)
                    self.experts.append(param)
        # FSDP2 cannot shard 0-dim tensors (the logit scale and bias, Soft MoE's router scale): they stay
        # replicated and are averaged by hand.
        self.replicated = [p for p in model.parameters() if p.dim() == 0]
        everyone, ignored = whole_mesh(mesh), set(self.replicated)
        for block in (m for m in model.modules() if isinstance(m, Block)):
            fully_shard(block, mesh=everyone, ignored_params=ignored)
            register_fsdp_forward_method(block, "forward_pair")  # one-tower training calls this, not forward
        fully_shard(model, mesh=everyone, ignored_params=ignored)
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
        for param in self.experts:
            if param.grad is not None:
                _local(param.grad).div_(self.ep_size)
        for param in self.replicated:
            if param.grad is None:  # every rank must take part in every reduction
                param.grad = torch.zeros_like(param)
        if self.replicated:
            flat = torch.stack([p.grad for p in self.replicated])
            dist.all_reduce(flat)
            for param, grad in zip(self.replicated, flat / self.world.size):
                param.grad.copy_(grad)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # Every sharded gradient element lives on exactly one rank (FSDP shards, EP shards of distinct experts):
        # their squared norm is the sum over ranks of the local squares. Replicated ones count once.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        square = sum((_local(g).detach().float().pow(2).sum() for g in grads if isinstance(g, DTensor)),
                     torch.zeros((), device=self.device))
        dist.all_reduce(square)
        square += sum((g.detach().float().pow(2).sum() for g in grads if not isinstance(g, DTensor)),
                      torch.zeros((), device=self.device))
        total = square.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(coef.to(g.dtype))
        return total

    def full_state(self, model, optimizer):
        """The whole weights, for rank 0's evaluation copy (collective); optimizer states are never gathered:
        checkpoints are written sharded (`save`)."""
        weights = {k: _full(v) for k, v in model.state_dict().items()}  # the same order on every rank
        if self.groups is not None:
            weights = gather_full_state_dict(model, self.groups, weights)
        return weights, None

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, run_dir, step, model, optimizer, state, config_json, tokenizer, keep_last):
        tensors, names = self._global_state(model, optimizer)
        meta = ckpt.optimizer_state(optimizer)[1]  # param groups and scalars; the tensors go to DCP
        path = sharded.save(run_dir, step, tensors, names, meta, model.config, state, config_json, tokenizer,
                            keep_last, self.world.rank)
        return path if self.world.main else None

    def _global_state(self, model, optimizer) -> tuple[dict[str, torch.Tensor], list[str]]:
        """DCP's state dict: every tensor as this rank's shard of its global, single-process tensor; and the
        parameter names in the optimizer's order."""
        expert_keys = set(expert_state_keys(model))
        out = {f"model.{k}": self._global(v, k in expert_keys) for k, v in model.state_dict().items()}
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        for param, per_param in optimizer.state.items():
            for slot, value in per_param.items():
                out[f"optim.{names[id(param)]}.{slot}"] = self._global(value, is_expert_parameter(param))
        return out, order

    def _global(self, t: torch.Tensor, expert: bool) -> torch.Tensor:
        if not expert or self.groups is None or t.dim() == 0:
            return t  # FSDP's DTensors are global already; 0-dim tensors are replicated
        local = _local(t)
        shape = (t.shape[0] * self.ep_size, *t.shape[1:])  # t's shape is this EP shard's [E/P, ...]
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.expert_mesh, [Shard(0), Shard(0)], run_check=False, shape=shape,
                                  stride=stride)

    def load_full_state(self, model, optimizer, checkpoint, opt_tensors, opt_meta) -> None:
        if sharded.is_sharded(checkpoint):
            return self._load_sharded(model, optimizer, checkpoint, opt_meta)
        weights = ckpt.checked_weights(model, checkpoint)
        if self.groups is not None:
            weights = shard_state_dict(weights, expert_state_keys(model), self.groups.ep_rank, self.groups.ep_size)
        own = model.state_dict()
        model.load_state_dict({k: _like(v, own[k]) for k, v in weights.items()})
        if self.groups is not None:
            opt_tensors = ep.shard_optimizer_tensors(optimizer, opt_tensors, self.groups)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        placed = {}
        for key, value in opt_tensors.items():
            if key.startswith("state.") and value.dim() >= 1:  # not AdamW's step count
                value = _like(value, params[int(key.split(".")[1])])
            placed[key] = value
        ckpt.load_optimizer_state(optimizer, placed, opt_meta)

    def _load_sharded(self, model, optimizer, checkpoint, opt_meta) -> None:
        """DCP reads each rank's shards straight into its parameters and AdamW moments (resharding as needed)."""
        for group in optimizer.param_groups:  # AdamW creates its state lazily: create it to be filled
            for param in group["params"]:
                optimizer.state[param] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}
        tensors, _ = self._global_state(model, optimizer)
        try:
            dcp.load(tensors, storage_reader=sharded.reader(checkpoint))
        except ckpt.CheckpointError:
            raise
        except Exception as e:  # DCP's CheckpointException wraps every rank's error
            raise ckpt.CheckpointError(f"{checkpoint}: cannot load the sharded checkpoint "
                                       f"({sharded.first_line(e)})") from None
        own = model.state_dict()
        for key, value in own.items():  # DCP loads in place; copies are made only where a tensor was wrapped
            loaded = tensors[f"model.{key}"]
            if loaded is not value:
                _local(value).copy_(_local(loaded))
        names = {id(p): n for n, p in model.named_parameters()}
        for param, per_param in optimizer.state.items():
            for slot, value in per_param.items():
                loaded = tensors[f"optim.{names[id(param)]}.{slot}"]
                if loaded is not value:
                    _local(value).copy_(_local(loaded))
        for group, saved in zip(optimizer.param_groups, opt_meta["param_groups"]):
            group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})

    def eval_model(self, model, build):
        return self._whole_copy(model, build)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` placed as `target` is (this rank's shard when target is a DTensor); every rank holds `full`."""
    if not isinstance(target, DTensor):
        return full
    return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
