"""Soft MoE (Puigcerver et al. 2023): each slot is a convex mixture of its routing group's tokens, each token's
output a convex mixture of every slot's output; nothing is dropped.

Per group of m tokens, E experts with p slots each (Z = E p slots) and a learned phi [d, Z]: logits = scale *
normalize(x) normalize(phi) [m, Z] in float32, both l2-normalised over d and scaled by a learned scalar
(initialised to 1), as the paper does so that the logits do not grow with d. normalize(v) = v / sqrt(|v|^2 +
1e-6), V-MoE's (its epsilon inside the square root). phi starts as V-MoE's lecun_normal over (d, E, p), or with
`soft_init="unit_columns"` at std 1/sqrt(d) (the runs measured before V-MoE's init was the default).
Dispatch D = softmax over the group's tokens (each slot's column), combine C = softmax over the slots (each
token's row); slot inputs D^T X run through their experts (slots z // p == e go to expert e) and y = C Y.
Padding is masked out of D and gets a zero row of C.

phi has a column per slot, so p is fixed: `MoeConfig.slots_per_expert`, which a model sets by default to the top-1
capacity of its training routing group (limoe.model.config), so the E p slots cost what top_k's k=1 buffers cost.
`k` must be 1; `batch_priority`, `noise_std` and the capacity options (beyond that default) do not apply.

Statistics and `limoe analyze` see each token's expert with the largest combine weight (summed over its slots),
`SoftRouting`'s summary. Losses: the z-loss of the slot logits and LIMoE's per-modality local and global entropy
of that per-token distribution over experts (the combine weights summed per expert), as top_k reports them.
"""

from __future__ import annotations

import torch
from torch import nn

from limoe.moe import aux_losses
from limoe.moe.routers.base import DistributionRouter, RouterOutput, no_autocast
from limoe.moe.routing import SoftRouting


class SoftRouter(DistributionRouter):
    """Slots mix tokens, tokens mix slots (see the module docstring); parameters `router_dN`, `router_scale`."""

    def __init__(self, config):
        super().__init__(config)
        if config.slots_per_expert is None:
            raise ValueError("moe.router='soft' needs moe.slots_per_expert")
        self.slots_per_expert = config.slots_per_expert
        # phi [d, Z]; the name keeps its older N for the slots: it is a checkpoint key.
        self.router_dN = nn.Parameter(torch.empty(config.dim, config.num_experts * self.slots_per_expert))
        self.router_scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # lecun_normal (a normal truncated at 2 std, std 1/sqrt(fan_in) after truncation). V-MoE's phi is a
        # (d, E, p) kernel, whose fan_in flax counts as d * E; "unit_columns" counts d.
        fan_in = self.config.dim * (self.config.num_experts if self.config.soft_init == "vmoe" else 1)
        std = fan_in ** -0.5 / 0.87962566103423978
        nn.init.trunc_normal_(self.router_dN, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.router_scale.fill_(1.0)

    def extra_repr(self) -> str:
        return f"num_experts={self.config.num_experts}, slots_per_expert={self.slots_per_expert}"

    @property
    def loss_names(self) -> tuple[str, ...]:
        return self.shared_loss_names

    def capacity_for(self, num_tokens: int) -> int:
        """Slots per expert: fixed (phi has a column per slot), whatever the group's size."""
        return self.slots_per_expert

    def logits(self, x_Sd: torch.Tensor) -> torch.Tensor:
        """scale * normalize(x) normalize(phi): [S, Z], float32 even under autocast."""
        with no_autocast(x_Sd.device.type):
            x_Sd = l2_normalize(x_Sd.float(), dim=-1)
            phi_dZ = l2_normalize(self.router_dN.float(), dim=0)
            return self.router_scale.float() * (x_Sd @ phi_dZ)

    def forward(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                num_groups: int = 1) -> RouterOutput:
        cfg = self.config
        num_tokens, num_experts = x_Sd.shape[0], cfg.num_experts
        logits_SZ = self.logits(x_Sd)
        dispatch_SZ, combine_SZ = soft_weights(logits_SZ, valid_S, num_groups)
        q_SE = combine_SZ.view(num_tokens, num_experts, self.slots_per_expert).sum(-1)
        # Clamped inside the log: padding rows are all 0, where xlogy's gradient would be 0 * inf = NaN.
        entropy_S = -(q_SE * q_SE.clamp_min(1e-20).log()).sum(-1)
        gate_S1, expert_S1 = q_SE.max(1, keepdim=True)
        kept_S1 = (torch.ones_like(expert_S1, dtype=torch.bool) if valid_S is None else valid_S[:, None].clone())
        slot_S1 = torch.where(kept_S1, 0, -1)
        routing = SoftRouting(expert_S1, slot_S1, gate_S1, kept_S1, self.slots_per_expert, num_experts, num_groups,
                              dispatch_SZ=dispatch_SZ, combine_SZ=combine_SZ)
        w_SM = aux_losses.modality_weights(modality_S, valid_S, len(cfg.modalities))
        return RouterOutput(routing, self.shared_losses(logits_SZ, q_SE, entropy_S, w_SM, num_groups), entropy_S,
                            w_SM)


def l2_normalize(v: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """v / sqrt(|v|^2 + eps) along `dim`: V-MoE's normalisation (`F.normalize` divides by max(|v|, eps) instead)."""
    return v * torch.rsqrt(v.square().sum(dim, keepdim=True) + eps)


def soft_weights(logits_SZ: torch.Tensor, valid_S: torch.Tensor | None = None, num_groups: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch (softmax over each group's valid tokens, per slot) and combine (softmax over the slots, per valid
    token) weights, both [S, Z]; padding gets 0 in both, and a group without valid tokens all-zero slots."""
    num_tokens, num_slots = logits_SZ.shape
    logits_GmZ = logits_SZ.view(num_groups, -1, num_slots)
    if valid_S is None:
        return torch.softmax(logits_GmZ, dim=1).view(num_tokens, num_slots), torch.softmax(logits_SZ, dim=-1)
    valid_Gm1 = valid_S.view(num_groups, -1, 1)
    # A finite floor, not -inf: a group of padding only then gets a uniform softmax that the mask zeroes, not NaN.
    masked_GmZ = torch.where(valid_Gm1, logits_GmZ, torch.finfo(logits_SZ.dtype).min)
    dispatch_GmZ = torch.softmax(masked_GmZ, dim=1) * valid_Gm1
    combine_SZ = torch.where(valid_S[:, None], torch.softmax(logits_SZ, dim=-1), 0.0)
    return dispatch_GmZ.view(num_tokens, num_slots), combine_SZ
