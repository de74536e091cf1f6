"""What every strategy whose ranks hold parts of the model shares (expert parallelism, FSDP): nothing is gathered.

- Checkpoints are sharded (limoe/checkpoint/sharded.py): each rank writes its pieces of the single-process tensors,
  experts as shards of the global [E, ...] tensors, and loads its pieces of any checkpoint, resharding as needed.
- Evaluation runs on every rank, with the same held-out data, on the sharded model itself: its layers' collectives
  need every rank. Rank 0 reports.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

from limoe import checkpoint as ckpt
from limoe.checkpoint import sharded as sharded_checkpoint
from limoe.model.registry import build_model
from limoe.moe.parallel import expert_state_keys
from limoe.parallel.mesh import ExpertParallelGroups
from limoe.parallel.strategy import Strategy


class ShardedStrategy(Strategy):
    """The base of `ExpertParallel` and `Fsdp`: their checkpoints, their share of single-process tensors, and
    evaluation by every rank."""

    collective_eval = True

    def __init__(self, world, device: torch.device, ep_size: int, num_experts: int):
        super().__init__(world, device)
        self.ep_size, self.num_experts = ep_size, num_experts
        self.groups: ExpertParallelGroups | None = None
        self.expert_mesh: DeviceMesh | None = None
        self.expert_names: frozenset[str] = frozenset()  # the model's expert tensors, set by `shard`

    def _set_expert_mesh(self, mesh: DeviceMesh) -> None:
        """The run's mesh with its dims in the order ("ep", "expert_dp") (collective). An expert tensor's rows sit at
        EP rank x E/P + the row in its EP shard, so its placements list the "ep" dim first."""
        self.expert_mesh = DeviceMesh(self.device.type, mesh.mesh.transpose(0, 1), mesh_dim_names=("ep", "expert_dp"))

    def _name_experts(self, model: nn.Module) -> None:
        """Remember which tensors are experts' (by name: names survive `to_empty` and FSDP's wrapping), once per
        run rather than on every step."""
        self.expert_names = frozenset(expert_state_keys(model))

    def expert_placements(self) -> list[Placement]:
        """How this rank's expert tensor (a plain EP shard, or FSDP's DTensor of one) lies on `expert_mesh`."""
        raise NotImplementedError

    def clip_sharded(self, params: list[nn.Parameter], sharded: list[bool], max_norm: float, group) -> torch.Tensor:
        """Clip the gradient norm of the whole, unsharded model, as `clip_grad_norm_` in one process would; returns
        it before clipping. `sharded[i]`: each element of params[i]'s gradient lives on exactly one rank of `group`
        (None: all ranks); the others are the same on every rank and count once. One all_reduce, no host sync."""
        square_sharded = torch.zeros((), device=self.device)
        square_replicated = torch.zeros((), device=self.device)
        for param, split in zip(params, sharded):
            square = local(param.grad).detach().float().pow(2).sum().to(self.device)
            if split:
                square_sharded += square
            else:
                square_replicated += square
        dist.all_reduce(square_sharded, group=group)
        total = (square_sharded + square_replicated).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for param in params:
            local(param.grad).mul_(coef.to(param.grad.dtype))
        return total

    def load_part(self, module, full):
        own = module.state_dict()
        experts = set(expert_state_keys(module))
        for key, value in full.items():
            local(own[key]).copy_(local(self._place(value, own[key], key in experts)))

    def _place(self, full: torch.Tensor, target: torch.Tensor, expert: bool) -> torch.Tensor:
        """A single-process tensor cut as `target` is: this rank's experts, then FSDP's chunk of them."""
        if expert and self.groups is not None:
            per_rank = full.shape[0] // self.ep_size
            full = full[self.groups.ep_rank * per_rank:(self.groups.ep_rank + 1) * per_rank]
        if isinstance(target, DTensor):
            return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                     src_data_rank=None)
        return full

    def save(self, run_dir, step, model, optimizer, state, config_json, tokenizer, keep_last):
        tensors, names = self._global_state(model, optimizer)
        meta = ckpt.optimizer_state(optimizer)[1]  # param groups and scalars; the tensors go to DCP
        path = sharded_checkpoint.save(run_dir, step, tensors, names, meta, model.config, state, config_json,
                                       tokenizer, keep_last, self.world.rank)
        return path if self.world.main else None

    def _global_state(self, model, optimizer) -> tuple[dict[str, torch.Tensor], list[str]]:
        """DCP's state dict: every tensor as this rank's shard of its global, single-process tensor (plain tensors
        are the same on every rank); and the parameter names in the optimizer's order."""
        expert_keys = self.expert_names
        out = {f"model.{k}": self._global(v, k in expert_keys) for k, v in model.state_dict().items()}
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        for param, per_param in optimizer.state.items():
            for slot, value in per_param.items():
                out[f"optim.{names[id(param)]}.{slot}"] = self._global(value, names[id(param)] in expert_keys)
        return out, order

    def _global(self, t: torch.Tensor, expert: bool) -> torch.Tensor:
        if not expert or self.groups is None or t.dim() == 0:
            return t  # FSDP's DTensors are global already; 0-dim tensors (AdamW's step) are replicated
        shape = (t.shape[0] * self.ep_size, *t.shape[1:])  # t's shape is this EP shard's [E/P, ...]
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))  # contiguous
        return DTensor.from_local(local(t), self.expert_mesh, self.expert_placements(), run_check=False,
                                  shape=shape, stride=stride)

    def load_full_state(self, model, optimizer, checkpoint, opt_tensors, opt_meta) -> None:
        if not ckpt.is_sharded(checkpoint):
            return self._load_single_folder(model, optimizer, checkpoint, opt_tensors, opt_meta)
        for group in optimizer.param_groups:  # AdamW creates its state lazily: create it to be filled
            for param in group["params"]:
                optimizer.state[param] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}
        tensors, _ = self._global_state(model, optimizer)
        try:  # DCP reads each rank's pieces straight into its parameters and AdamW moments
            dcp.load(tensors, storage_reader=sharded_checkpoint.reader(checkpoint))
        except ckpt.CheckpointError:
            raise
        except sharded_checkpoint.DCP_ERRORS as e:  # DCP's CheckpointException wraps every rank's error
            raise ckpt.CheckpointError(f"{checkpoint}: cannot load the sharded checkpoint "
                                       f"({sharded_checkpoint.first_line(e)})") from None
        own = model.state_dict()
        for key, value in own.items():  # DCP loads in place; copies are made only where a tensor was wrapped
            loaded = tensors[f"model.{key}"]
            if loaded is not value:
                local(value).copy_(local(loaded))
        names = {id(p): n for n, p in model.named_parameters()}
        for param, per_param in optimizer.state.items():
            for slot, value in per_param.items():
                loaded = tensors[f"optim.{names[id(param)]}.{slot}"]
                if loaded is not value:
                    local(value).copy_(local(loaded))
        for group, saved in zip(optimizer.param_groups, opt_meta["param_groups"]):
            group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})

    def _load_single_folder(self, model: nn.Module, optimizer, checkpoint, opt_tensors, opt_meta) -> None:
        """A checkpoint in the single-process layout (`model.safetensors`): this rank takes its share of it."""
        with torch.device("meta"):  # the shapes it must have: the single-process model's
            whole = build_model(model.config)
        self.load_part(model, ckpt.checked_weights(whole, checkpoint))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        names, experts = {id(p): n for n, p in model.named_parameters()}, self.expert_names
        placed = {}
        for key, value in opt_tensors.items():  # "state.<index>.<name>"; AdamW's step count is 0-dim
            if key.startswith("state.") and value.dim() >= 1:
                param = params[int(key.split(".")[1])]
                value = self._place(value, param, names[id(param)] in experts)
            placed[key] = value
        ckpt.load_optimizer_state(optimizer, placed, opt_meta)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
