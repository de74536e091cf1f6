"""The router contract: which tokens go to which experts, and the aux losses that shape that choice.

    out = router(x_Sd, modality_S, valid_S, num_groups)   # -> RouterOutput(routing, losses, entropy_S, weights_SM)

- x_Sd: the S tokens of `num_groups` routing groups of S / num_groups consecutive tokens each; every group is
  routed on its own (its own capacity, priority order and aux losses, the losses averaged over groups).
- modality_S: long [S], each token's index into `config.modalities`; valid_S: bool [S] or None (all valid).
  Padding (False) is never routed and never counted.
- routing: the assignments (`limoe.moe.routing.Routing`); the dispatcher moves tokens by it alone. Soft MoE
  assigns no token to an expert: its `SoftRouting` carries dispatch and combine weights, which the dispatcher
  mixes by, and its Routing fields summarise them for the statistics.
- losses: unweighted, differentiable scalars, keyed exactly by `loss_names` (the names training weighs and logs:
  each must have a weight in `LossConfig`, or training stops with an error naming it).
- entropy_S: the entropy (nats) of each token's clean routing distribution, for the routing statistics.
- weights_SM: each token's one-hot modality, zero for padding (`losses.modality_weights`), which the per-modality
  losses weigh by; the layer counts its statistics with the same weights instead of computing them again.

A router owns its parameters; `MoeMlp` stores them at its own level of the state dict (`<layer>.router_dE`, not
`<layer>.router.router_dE`), so routers' parameter names start with "router_" and never clash with the layer's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from limoe.moe import aux_losses
from limoe.moe.routing import Routing, capacity

if TYPE_CHECKING:
    from limoe.moe.config import MoeConfig


def no_autocast(device_type: str):
    """A context that turns autocast off on `device_type`, where autocast exists (not e.g. on the meta device,
    where models are sized): router logits stay float32, as routing is sensitive to rounding."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@dataclass
class RouterOutput:
    routing: Routing
    losses: dict[str, torch.Tensor]
    entropy_S: torch.Tensor
    weights_SM: torch.Tensor  # float [S, M]: one-hot modality per token, zero for padding


class Router(nn.Module):
    """Base of every router: built from a MoeConfig, called as in the module docstring."""

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The keys of `RouterOutput.losses`, in the order the router reports them."""
        raise NotImplementedError

    def forward(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                num_groups: int = 1) -> RouterOutput:
        raise NotImplementedError


class DistributionRouter(Router):
    """A router built from a MoeConfig that gives each token a distribution over the E experts, whose losses are
    the router z-loss and LIMoE's per-modality local and thresholded global entropy (`shared_losses`, named
    `shared_loss_names`)."""

    def __init__(self, config: MoeConfig):
        super().__init__()
        self.config = config

    @property
    def shared_loss_names(self) -> tuple[str, ...]:
        return ("z",) + tuple(f"{kind}/{m}" for m in self.config.modalities
                              for kind in ("local_entropy", "global_entropy"))

    def shared_losses(self, logits_SE: torch.Tensor, p_SE: torch.Tensor, entropy_S: torch.Tensor,
                      w_SM: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
        """z-loss of the logits and per-modality local / global entropy of the per-token distribution over experts
        p_SE (the clean softmax), each on each routing group, averaged over the groups that have tokens (of that
        modality). The logits may have other columns than experts (Soft MoE: slots)."""
        cfg = self.config
        logits_GSE, p_GSE, entropy_GS, w_GSM = (
            t.view(num_groups, -1, *t.shape[1:]) for t in (logits_SE, p_SE, entropy_S, w_SM))
        w_GS = w_GSM.sum(-1)
        count_G, count_GM = w_GS.sum(-1), w_GSM.sum(-2)
        out = {"z": aux_losses.mean_over_groups(aux_losses.z_loss(logits_GSE, w_GS), count_G)}
        local_M = aux_losses.mean_over_groups(aux_losses.local_entropy_loss(entropy_GS, w_GSM), count_GM)
        # Built on the device, not copied from a host list: a blocking copy would sync the host every call.
        min_experts_M = torch.stack([p_SE.new_full((), float(v)) for v in cfg.min_experts_per_modality])
        global_M = aux_losses.mean_over_groups(aux_losses.global_entropy_loss(p_GSE, w_GSM, min_experts_M), count_GM)
        for m, name in enumerate(cfg.modalities):
            out[f"local_entropy/{name}"] = local_M[m]
            out[f"global_entropy/{name}"] = global_M[m]
        return out


class LinearRouter(DistributionRouter):
    """What the softmax routers share: a linear map to E logits (`router_dE`, float32), the capacity from the
    config's factors, and the losses of the clean softmax (`shared_losses`)."""

    def __init__(self, config: MoeConfig):
        super().__init__(config)
        self.router_dE = nn.Parameter(torch.empty(config.dim, config.num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # V-MoE's router is a flax Dense without bias: lecun_normal, i.e. a normal truncated at 2 std whose
        # std is 1/sqrt(d) after truncation (hence the division by the truncated normal's std, 0.8796).
        std = self.config.dim ** -0.5 / 0.87962566103423978
        nn.init.trunc_normal_(self.router_dE, std=std, a=-2 * std, b=2 * std)

    def capacity_for(self, num_tokens: int) -> int:
        raise NotImplementedError

    def capacity_with_k(self, num_tokens: int, k: int) -> int:
        """Slots per expert for `num_tokens` tokens, k choices each, with this mode's (train / eval) factor."""
        cfg = self.config
        factor = cfg.capacity_factor if self.training else (cfg.eval_capacity_factor or cfg.capacity_factor)
        return capacity(num_tokens, cfg.num_experts, k, factor, cfg.capacity_multiple_of, cfg.capacity_rounding)

    def group_capacity(self, group_tokens: int, valid_S: torch.Tensor | None, num_groups: int
                       ) -> tuple[int, torch.Tensor | None]:
        """Slots per expert and group (buffer size), and per-group limits when they differ by group."""
        if self.config.capacity_tokens == "valid" and valid_S is not None:
            # Host sync: the buffers' shape follows the data.
            caps = [self.capacity_for(max(1, n)) for n in valid_S.view(num_groups, -1).sum(1).tolist()]
            if len(set(caps)) > 1:
                return max(caps), torch.tensor(caps, device=valid_S.device)
            return caps[0], None
        return self.capacity_for(group_tokens), None

    def clean_logits(self, x_Sd: torch.Tensor) -> torch.Tensor:
        """Logits x W_r [S, E], float32 even under autocast: routing decisions are sensitive to rounding."""
        with no_autocast(x_Sd.device.type):
            return x_Sd.float() @ self.router_dE.float()

    def logits(self, x_Sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and noisy logits [S, E]: in training, V-MoE's noise of std noise_std / E (the same tensor without
        noise). The noisy ones route and weigh the outputs; the clean ones feed the losses."""
        logits_SE = self.clean_logits(x_Sd)
        if self.training and self.config.noise_std > 0:
            noise_std = self.config.noise_std / self.config.num_experts
            return logits_SE, logits_SE + noise_std * torch.randn_like(logits_SE)
        return logits_SE, logits_SE
