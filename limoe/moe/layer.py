"""The sparse MoE MLP: router -> dispatcher -> experts, each routing group of the input on its own.

The parts and their contracts: the router (limoe.moe.routers: tokens -> assignments + aux losses), the dispatcher
(limoe.moe.dispatch: tokens -> expert rows -> tokens, where expert parallelism exchanges rows) and the stacked
experts (limoe.moe.experts). This layer forms the routing groups, checks its inputs and counts the statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from limoe.moe.config import ROUTING_GROUPS, MoeConfig
from limoe.moe.dispatch import Dispatcher
from limoe.moe.experts import ExpertMlps
from limoe.moe.routers import Router, make_router
from limoe.moe.routing import Routing
from limoe.moe.stats import MoeStats

# MoeConfig, ROUTING_GROUPS: imported from here too
__all__ = ["ROUTING_GROUPS", "MoeAux", "MoeConfig", "MoeMlp", "set_eval_capacity_factor"]


@dataclass
class MoeAux:
    """What one MoE call reports besides its output: unweighted aux losses and routing statistics."""

    losses: dict[str, torch.Tensor]  # scalar, differentiable; the caller weights and sums them
    stats: MoeStats
    routing: Routing
    router: str = "top_k"  # MoeConfig.router: which defaults weigh the losses (limoe.losses.LossConfig)


class MoeMlp(nn.Module):
    """Sparse Mixture-of-Experts MLP; each routing group of its input is routed on its own.

    forward(x [B, ..., d], modality=None | int | long [B, ...], valid=None | bool [B, ...]) -> (y, MoeAux).
    Dim 0 counts examples: `config.group_size` consecutive examples form one group (None: the whole input is
    one group). If B is not a multiple of the group size, the last group is filled up with padding examples, so
    every group has the same capacity. `modality` indexes `config.modalities` (None: every token is
    modalities[0]); `valid` False marks padding, which is neither routed nor counted and gets 0 from this layer.
    Capacity is computed from all tokens of a group, padding included, so it never depends on data (no host
    synchronisation), unless `capacity_tokens="valid"`.

    `experts`, `router`, `dispatcher`: prebuilt parts (e.g. an expert-parallel shard of the experts, so that the
    full set is never allocated); by default the ones `config` names.
    """

    def __init__(self, config: MoeConfig, experts: ExpertMlps | None = None, router: Router | None = None,
                 dispatcher: Dispatcher | None = None):
        super().__init__()
        self.config = config
        if experts is None:
            experts = ExpertMlps(config.num_experts, config.dim, config.hidden_dim,
                                 shared_init=config.expert_init == "shared")
        # The router draws its init after the experts but is registered before them: for a seed, the same weights
        # and the same parameter order (optimizer states) as before the layer was split into parts.
        self.router = router if router is not None else make_router(config)
        self.experts = experts
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher(config.expert_backend)
        # The router's tensors sit at this layer's level of the state dict ("router_dE"), as they always have.
        self.register_state_dict_post_hook(_flatten_router_keys)
        self.register_load_state_dict_pre_hook(_nest_router_keys)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, hidden_dim={c.hidden_dim}, router={c.router}, group_size={c.group_size}"

    def capacity_for(self, num_tokens: int) -> int:
        """The router's slots per expert for a group of `num_tokens` tokens (top_k: capacity in this mode)."""
        return self.router.capacity_for(num_tokens)

    def forward(self, x: torch.Tensor, modality: int | torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoeAux]:
        cfg = self.config
        if x.dim() < 1 or x.shape[-1] != cfg.dim:
            raise ValueError(f"x must have last dimension dim={cfg.dim}, got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        x_Sd = x.reshape(-1, cfg.dim)
        num_tokens = x_Sd.shape[0]
        modality_S = self._modality_ids(modality, lead_shape, x.device).reshape(-1)
        valid_S = self._valid_mask(valid, lead_shape).reshape(-1) if valid is not None else None
        num_groups = 1
        if cfg.group_size is not None:
            x_Sd, modality_S, valid_S, num_groups = self._fill_groups(x_Sd, modality_S, valid_S, lead_shape)

        routed = self.router(x_Sd, modality_S, valid_S, num_groups)
        routing = routed.routing
        y_Sd = self.dispatcher(x_Sd, routing, self.experts)

        stats = MoeStats.compute(cfg.modalities, routed.weights_SM, routing.expert_SK, routing.kept_SK,
                                 routed.entropy_S, cfg.num_experts, routing.ranked)
        if x_Sd.shape[0] != num_tokens:  # drop the padding examples that filled the last group
            y_Sd, routing = y_Sd[:num_tokens], routing.token_slice(num_tokens)
        return y_Sd.reshape(x.shape), MoeAux(routed.losses, stats, routing, self.config.router)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _fill_groups(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None,
                     lead_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Append padding examples until dim 0 is a multiple of the group size; returns the number of groups."""
        group = self.config.group_size
        examples = lead_shape[0] if lead_shape else 1
        missing = -examples % group
        if missing == 0:
            return x_Sd, modality_S, valid_S, examples // group
        num_tokens = x_Sd.shape[0]
        pad = missing * (num_tokens // examples if examples else 1)
        x_Sd = torch.cat([x_Sd, x_Sd.new_zeros(pad, x_Sd.shape[1])])
        modality_S = torch.cat([modality_S, modality_S.new_zeros(pad)])
        real_S = valid_S if valid_S is not None else torch.ones(num_tokens, dtype=torch.bool, device=x_Sd.device)
        valid_S = torch.cat([real_S, real_S.new_zeros(pad)])
        return x_Sd, modality_S, valid_S, (examples + missing) // group

    def _modality_ids(self, modality: int | torch.Tensor | None, lead_shape: torch.Size,
                      device: torch.device) -> torch.Tensor:
        num_modalities = len(self.config.modalities)
        if modality is None:
            modality = 0
        if isinstance(modality, int):
            if not 0 <= modality < num_modalities:
                raise ValueError(f"modality must be in [0, {num_modalities}) for {self.config.modalities}, "
                                 f"got {modality}")
            return torch.full(lead_shape, modality, dtype=torch.long, device=device)
        if modality.shape != lead_shape or modality.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"modality must be an integer tensor of shape {tuple(lead_shape)}, got "
                             f"{modality.dtype} {tuple(modality.shape)}")
        # A data-dependent check: on accelerators it would stall the stream, and compiled graphs cannot hold it.
        if modality.device.type == "cpu" and not torch.compiler.is_compiling():
            if modality.numel() and not (0 <= int(modality.min()) and int(modality.max()) < num_modalities):
                raise ValueError(f"modality ids must be in [0, {num_modalities}) for {self.config.modalities}")
        return modality.long().to(device)

    @staticmethod
    def _valid_mask(valid: torch.Tensor, lead_shape: torch.Size) -> torch.Tensor:
        if valid.shape != lead_shape or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {tuple(lead_shape)}, got "
                             f"{valid.dtype} {tuple(valid.shape)}")
        return valid


def set_eval_capacity_factor(model: nn.Module, factor: float) -> int:
    """Evaluate every MoE layer of `model` with capacity factor `factor` (how much evaluation drops; training's
    factor is untouched); returns how many layers changed. A model without capacity-limited MoE layers (dense, or
    Soft MoE, which drops nothing) is a ValueError."""
    if not (isinstance(factor, (int, float)) and factor > 0):
        raise ValueError(f"the capacity factor must be > 0, got {factor!r}")
    layers = [m for m in model.modules() if isinstance(m, MoeMlp)]
    if not layers:
        raise ValueError("the model has no MoE layers: a capacity factor means nothing to it")
    if any(layer.config.router == "soft" for layer in layers):
        raise ValueError("Soft MoE layers have slots, not a capacity: they drop nothing")
    for layer in layers:
        layer.config = dataclasses.replace(layer.config, eval_capacity_factor=float(factor))
        layer.router.config = layer.config
    return len(layers)


def _flatten_router_keys(layer: MoeMlp, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: "<prefix>router.<name>" -> "<prefix><name>", every key keeping its place."""
    nested = prefix + "router."
    items = list(state_dict.items())
    state_dict.clear()
    state_dict.update((prefix + key[len(nested):] if key.startswith(nested) else key, value) for key, value in items)


def _nest_router_keys(layer: MoeMlp, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: "<prefix><name>" -> "<prefix>router.<name>" for the router's tensors."""
    for name in layer.router.state_dict(keep_vars=True):
        if prefix + name in state_dict:
            state_dict[f"{prefix}router.{name}"] = state_dict.pop(prefix + name)
