"""V-MoE's noisy top-k router with capacity and Batch Priority Routing, and LIMoE's per-modality aux losses.

Logits x W_r in float32; in training, noise of std noise_std / E is added, and the noisy softmax picks each
token's top-k experts and their gates (`limoe.moe.routing.route`), while the clean softmax feeds the losses
(importance, load, z, and per modality the local and the thresholded global entropy: limoe.moe.losses).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from limoe.moe import losses
from limoe.moe.routers.base import Router, RouterOutput
from limoe.moe.routing import capacity, route

if TYPE_CHECKING:
    from limoe.moe.config import MoeConfig


class TopKRouter(Router):
    """Each token picks its top-k experts; each expert takes at most C tokens of each group (the rest drop)."""

    def __init__(self, config: MoeConfig):
        super().__init__()
        self.config = config
        self.router_dE = nn.Parameter(torch.empty(config.dim, config.num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # V-MoE's router is a flax Dense without bias: lecun_normal, i.e. a normal truncated at 2 std whose
        # std is 1/sqrt(d) after truncation (hence the division by the truncated normal's std, 0.8796).
        std = self.config.dim ** -0.5 / 0.87962566103423978
        nn.init.trunc_normal_(self.router_dE, std=std, a=-2 * std, b=2 * std)

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_experts={c.num_experts}, k={c.k}, capacity_factor={c.capacity_factor}/"
                f"{c.eval_capacity_factor or c.capacity_factor} (train/eval), batch_priority={c.batch_priority}, "
                f"noise_std={c.noise_std}")

    @property
    def loss_names(self) -> tuple[str, ...]:
        per_modality = tuple(f"{kind}/{m}" for m in self.config.modalities for kind in ("local_entropy",
                                                                                          "global_entropy"))
        return ("importance", "load", "z") + per_modality

    def capacity_for(self, num_tokens: int) -> int:
        """Slots per expert for a group of `num_tokens` tokens, with this mode's (train / eval) capacity factor."""
        cfg = self.config
        factor = cfg.capacity_factor if self.training else (cfg.eval_capacity_factor or cfg.capacity_factor)
        return capacity(num_tokens, cfg.num_experts, cfg.k, factor, cfg.capacity_multiple_of)

    def logits(self, x_Sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and noisy logits [S, E] (the same tensor without noise). Float32 even under autocast: routing
        decisions are sensitive to rounding."""
        device_type = x_Sd.device.type
        no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                       else contextlib.nullcontext())  # e.g. the meta device, where models are sized
        with no_autocast:
            logits_SE = x_Sd.float() @ self.router_dE.float()
        if self.training and self.config.noise_std > 0:
            noise_std = self.config.noise_std / self.config.num_experts
            return logits_SE, logits_SE + noise_std * torch.randn_like(logits_SE)
        return logits_SE, logits_SE

    def forward(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                num_groups: int = 1) -> RouterOutput:
        cfg = self.config
        logits_SE, noisy_logits_SE = self.logits(x_Sd)
        cap, capacity_G = self._group_capacity(x_Sd.shape[0] // num_groups, valid_S, num_groups)
        routing = route(torch.softmax(noisy_logits_SE, dim=-1), cfg.k, cap, cfg.batch_priority, valid_S,
                        num_groups, capacity_G)
        logp_SE = torch.log_softmax(logits_SE, dim=-1)
        p_SE = logp_SE.exp()
        entropy_S = -(p_SE * logp_SE).sum(-1)
        w_SM = losses.modality_weights(modality_S, valid_S, len(cfg.modalities))
        aux_losses = self._aux_losses(logits_SE, noisy_logits_SE, p_SE, entropy_S, w_SM, num_groups)
        return RouterOutput(routing, aux_losses, entropy_S)

    def _group_capacity(self, group_tokens: int, valid_S: torch.Tensor | None, num_groups: int
                        ) -> tuple[int, torch.Tensor | None]:
        """Slots per expert and group (buffer size), and per-group limits when they differ by group."""
        if self.config.capacity_tokens == "valid" and valid_S is not None:
            # Host sync: the buffers' shape follows the data.
            caps = [self.capacity_for(max(1, n)) for n in valid_S.view(num_groups, -1).sum(1).tolist()]
            if len(set(caps)) > 1:
                return max(caps), torch.tensor(caps, device=valid_S.device)
            return caps[0], None
        return self.capacity_for(group_tokens), None

    def _aux_losses(self, logits_SE: torch.Tensor, noisy_logits_SE: torch.Tensor, p_SE: torch.Tensor,
                    entropy_S: torch.Tensor, w_SM: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
        """Each loss on each routing group, averaged over the groups that have tokens (of that modality)."""
        cfg = self.config
        logits_GSE, noisy_GSE, p_GSE, entropy_GS, w_GSM = (
            t.view(num_groups, -1, *t.shape[1:]) for t in (logits_SE, noisy_logits_SE, p_SE, entropy_S, w_SM))
        w_GS = w_GSM.sum(-1)
        count_G, count_GM = w_GS.sum(-1), w_GSM.sum(-2)
        out = {"importance": losses.mean_over_groups(losses.importance_loss(p_GSE, w_GS), count_G)}
        if self.training and cfg.noise_std > 0:
            load_G = losses.load_loss(logits_GSE, noisy_GSE, cfg.noise_std / cfg.num_experts, cfg.k, w_GS)
            out["load"] = losses.mean_over_groups(load_G, count_G)
        else:
            out["load"] = logits_SE.new_zeros(())
        out["z"] = losses.mean_over_groups(losses.z_loss(logits_GSE, w_GS), count_G)
        local_M = losses.mean_over_groups(losses.local_entropy_loss(entropy_GS, w_GSM), count_GM)
        # Built on the device, not copied from a host list: a blocking copy would sync the host every call.
        min_experts_M = torch.stack([p_SE.new_full((), float(v)) for v in cfg.min_experts_per_modality])
        global_M = losses.mean_over_groups(losses.global_entropy_loss(p_GSE, w_GSM, min_experts_M), count_GM)
        for m, name in enumerate(cfg.modalities):
            out[f"local_entropy/{name}"] = local_M[m]
            out[f"global_entropy/{name}"] = global_M[m]
        return out
