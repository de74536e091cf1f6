"""Expert Choice routing (Zhou et al. 2022): each expert picks its top-C tokens of each routing group.

Logits x W_r in float32; in training, V-MoE's noise of std noise_std / E is added, and p = softmax over experts of
the noisy logits (V-MoE's top-items-per-expert router: the noisy gates pick and weigh). In every routing group,
expert e takes the C tokens with the largest p(e | token), C = capacity(group tokens, E, k=1, capacity factor),
so every expert's capacity is filled exactly whenever the group has at least C valid tokens; padding is never
picked, and a C larger than the group is an error (an expert cannot pick a token twice), as in V-MoE. A token may
be picked by 0 to E experts, and its output is the sum of p(e | token) * expert_e(token) over the experts that
picked it. There is no per-token order, so `batch_priority` does not apply, and `k` must be 1.

As a `Routing`, K = E columns: column e is expert e (expert_SK[s, e] = e); kept_SK[s, e] says whether expert e
picked token s, slot_SK[s, e] is the token's position in e's buffer for its group (0 .. picks - 1, by descending
p; C for a valid token e did not pick, -1 for padding) and gate_SK[s, e] = p(e | token). `Routing.ranked` is
False: column 0 is not a top choice. Losses: the clean softmax's z-loss and per-modality local and global
entropy, exactly as top_k reports them (no importance or load loss: the experts' loads are equal by construction),
weighed 0 by default (V-MoE trains Expert Choice without aux losses: `LossConfig`).
"""

from __future__ import annotations

import torch

from limoe.moe import aux_losses
from limoe.moe.routers.base import LinearRouter, RouterOutput
from limoe.moe.routing import Routing, group_ids, top_k_lowest_first


class ExpertChoiceRouter(LinearRouter):
    """Each expert picks its top-C tokens of each group; a token gets 0 .. E experts."""

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_experts={c.num_experts}, capacity_factor={c.capacity_factor}/"
                f"{c.eval_capacity_factor or c.capacity_factor} (train/eval)")

    @property
    def loss_names(self) -> tuple[str, ...]:
        return self.shared_loss_names

    def capacity_for(self, num_tokens: int) -> int:
        """Tokens each expert picks from a group of `num_tokens` tokens, with this mode's capacity factor."""
        return self.capacity_with_k(num_tokens, 1)

    def check_fits(self, cap: int, group_tokens: int) -> None:
        """V-MoE's top-items-per-expert cannot pick more items than a group has: neither can we."""
        if cap > group_tokens:
            c = self.config
            factor = c.capacity_factor if self.training else (c.eval_capacity_factor or c.capacity_factor)
            raise ValueError(
                f"moe.router='expert_choice': capacity {cap} (capacity factor {factor}, {c.num_experts} experts, "
                f"{c.capacity_rounding} to a multiple of moe.capacity_multiple_of={c.capacity_multiple_of}) exceeds "
                f"the routing group's {group_tokens} tokens; lower the factor or capacity_multiple_of, or route "
                f"larger groups (moe.group_size)")

    def forward(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                num_groups: int = 1) -> RouterOutput:
        cfg = self.config
        logits_SE, noisy_logits_SE = self.logits(x_Sd)
        group_tokens = x_Sd.shape[0] // num_groups
        cap, capacity_G = self.group_capacity(group_tokens, valid_S, num_groups)
        self.check_fits(cap, group_tokens)
        logp_SE = torch.log_softmax(logits_SE, dim=-1)
        p_SE = logp_SE.exp()
        entropy_S = -(p_SE * logp_SE).sum(-1)
        gates_SE = p_SE if noisy_logits_SE is logits_SE else torch.softmax(noisy_logits_SE, dim=-1)
        routing = expert_choice(gates_SE, cap, valid_S, num_groups, capacity_G)
        w_SM = aux_losses.modality_weights(modality_S, valid_S, len(cfg.modalities))
        return RouterOutput(routing, self.shared_losses(logits_SE, p_SE, entropy_S, w_SM, num_groups), entropy_S,
                            w_SM)


def expert_choice(p_SE: torch.Tensor, capacity: int, valid_S: torch.Tensor | None = None, num_groups: int = 1,
                  capacity_G: torch.Tensor | None = None) -> Routing:
    """Each expert takes the `capacity` (or, with `capacity_G`, group g's limit) valid tokens of each group with
    the largest p(e | token); the Routing described in the module docstring. Static shapes, no host sync."""
    num_tokens, num_experts = p_SE.shape
    per_group = num_tokens // num_groups
    if capacity > per_group:
        raise ValueError(f"expert choice: capacity {capacity} exceeds the group's {per_group} tokens")
    # Padding scores -1, below every probability, so that a group's valid tokens always come first (the picks
    # are sorted): an expert's picks of valid tokens are its slots 0 .. n - 1. Equal scores: earliest token first.
    score_SE = p_SE.detach() if valid_S is None else torch.where(valid_S[:, None], p_SE.detach(), -1.0)
    token_GCE = top_k_lowest_first(score_SE.view(num_groups, per_group, num_experts), capacity, dim=1)[1]
    rank_GCE = torch.arange(capacity, device=p_SE.device)[None, :, None].expand_as(token_GCE)
    slot_GSE = torch.full((num_groups, per_group, num_experts), capacity, dtype=torch.long, device=p_SE.device)
    slot_SE = slot_GSE.scatter_(1, token_GCE, rank_GCE).view(num_tokens, num_experts)
    group_S = group_ids(num_tokens, num_groups, p_SE.device)
    kept_SE = slot_SE < (capacity if capacity_G is None else capacity_G[group_S][:, None])
    if valid_S is not None:
        kept_SE &= valid_S[:, None]
        slot_SE = torch.where(valid_S[:, None], slot_SE, -1)
    expert_SE = torch.arange(num_experts, device=p_SE.device).expand(num_tokens, num_experts)
    return Routing(expert_SE, slot_SE, p_SE, kept_SE, capacity, num_experts, num_groups, ranked=False)
