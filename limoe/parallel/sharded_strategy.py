"""What every strategy whose ranks hold parts of the model shares (expert parallelism, FSDP): nothing is gathered.

- Checkpoints are sharded (limoe/checkpoint/sharded.py): each rank writes its pieces of the single-process tensors,
  experts as shards of the global [E, ...] tensors, and loads its pieces of any checkpoint, resharding as needed.
- Gradients, their norm and checkpoints follow the placement table the strategy writes when it shards the model
  (limoe/parallel/placement.py).
- Evaluation runs on every rank, with the same held-out data, on the sharded model itself: its layers' collectives
  need every rank. Rank 0 reports.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from limoe import checkpoint as ckpt
from limoe.checkpoint import sharded as sharded_checkpoint
from limoe.model.registry import build_model
from limoe.moe.parallel import expert_state_keys
from limoe.parallel.mesh import ExpertParallelGroups, device_mesh
from limoe.parallel.placement import Placements, TensorPlacement, local
from limoe.parallel.strategy import Strategy


class ShardedStrategy(Strategy):
    """The base of `ExpertParallel` and `Fsdp`: the model split by a subclass, then every layout-dependent step
    (checkpoints, gradient reduction, clipping) read from the placement table (limoe.parallel.placement)."""

    collective_eval = True

    def __init__(self, world, device: torch.device, ep_size: int, num_experts: int):
        super().__init__(world, device)
        self.ep_size, self.num_experts = ep_size, num_experts
        self.groups: ExpertParallelGroups | None = None
        self.placements: Placements | None = None  # written by `shard`

    def shard(self, model: nn.Module) -> None:
        shapes = {key: value.shape for key, value in model.state_dict().items()}  # single-process shapes
        mesh = device_mesh(self.ep_size, self.device.type)
        self._split(model, mesh)
        experts = frozenset(expert_state_keys(model))  # by name: names survive `to_empty` and FSDP's wrapping
        # The run's mesh with its dims in the order ("ep", "expert_dp"): an expert tensor's rows sit at
        # EP rank x E/P + the row in its EP shard, so its placements name the "ep" dim first.
        expert_mesh = (DeviceMesh(self.device.type, mesh.mesh.transpose(0, 1), mesh_dim_names=("ep", "expert_dp"))
                       if self.groups is not None else None)
        entries = {key: self._placement(shapes[key], value, key in experts, expert_mesh)
                   for key, value in model.state_dict().items()}
        # A parameter's name can differ from its state-dict key (MoeMlp files its router's at its own level): the
        # gradient steps and the optimizer's state look entries up by parameter name.
        key_of = {id(value): key for key, value in model.state_dict(keep_vars=True).items()}
        entries.update((name, entries[key_of[id(param)]]) for name, param in model.named_parameters())
        groups = {"world": None, "expert_dp": self.groups.expert_dp_group if self.groups is not None else None}
        self.placements = Placements(entries, groups)

    def _split(self, model: nn.Module, mesh: DeviceMesh) -> None:
        """Swap or wrap `model`'s parameters so that this rank holds its share (in place)."""
        raise NotImplementedError

    def _placement(self, shape: torch.Size, value: torch.Tensor, expert: bool,
                   expert_mesh: DeviceMesh | None) -> TensorPlacement:
        """Where tensor `value` (after `_split`, single-process shape `shape`) lives, and what its gradient needs."""
        raise NotImplementedError

    def reduce_gradients(self, model: nn.Module) -> None:
        self.placements.reduce_gradients(model)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return self.placements.clip_grad_norm(model, max_norm, self.device)

    def load_part(self, module, full, prefix=""):
        own = module.state_dict()
        for key, value in full.items():
            local(own[key]).copy_(local(self.placements.cut(prefix + key, value, own[key])))

    def save(self, run_dir, step, model, optimizer, state, config_json, tokenizer, keep_last):
        tensors, names = self._global_state(model, optimizer)
        meta = ckpt.optimizer_state(optimizer)[1]  # param groups and scalars; the tensors go to DCP
        path = sharded_checkpoint.save(run_dir, step, tensors, names, meta, model.config, state, config_json,
                                       tokenizer, keep_last, self.world.rank)
        return path if self.world.main else None

    def _global_state(self, model, optimizer) -> tuple[dict[str, torch.Tensor], list[str]]:
        """DCP's state dict: every tensor as this rank's shard of its global, single-process tensor (plain tensors
        are the same on every rank); and the parameter names in the optimizer's order."""
        view = self.placements.global_view
        out = {f"model.{k}": view(k, v) for k, v in model.state_dict().items()}
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        for param, per_param in optimizer.state.items():
            for slot, value in per_param.items():
                out[f"optim.{names[id(param)]}.{slot}"] = view(names[id(param)], value)
        return out, order

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
        names = {id(p): n for n, p in model.named_parameters()}
        placed = {}
        for key, value in opt_tensors.items():  # "state.<index>.<name>"; AdamW's step count is 0-dim
            if key.startswith("state.") and value.dim() >= 1:
                param = params[int(key.split(".")[1])]
                value = self.placements.cut(names[id(param)], value, param)
            placed[key] = value
        ckpt.load_optimizer_state(optimizer, placed, opt_meta)
