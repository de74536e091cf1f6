"""Expert Choice routing (Zhou et al. 2022): each expert picks its top-C tokens of each routing group.

Logits x W_r in float32, p = softmax over experts (no noise: `noise_std` does not apply). In every routing group,
expert e takes the C tokens with the largest p(e | token), C = capacity(group tokens, E, k=1, capacity factor),
so every expert's capacity is filled exactly whenever the group has at least C valid tokens; padding is never
picked. A token may be picked by 0 to E experts, and its output is the sum of p(e | token) * expert_e(token) over
the experts that picked it. There is no per-token order, so `batch_priority` does not apply, and `k` must be 1.

As a `Routing`, K = E columns: column e is expert e (expert_SK[s, e] = e); kept_SK[s, e] says whether expert e
picked token s, slot_SK[s, e] is the token's position in e's buffer for its group (0 .. picks - 1, by descending
p; C for a valid token e did not pick, -1 for padding) and gate_SK[s, e] = p(e | token). `Routing.ranked` is
False: column 0 is not a top choice. Losses: the clean softmax's z-loss and per-modality local and global
entropy, exactly as top_k reports them (no importance or load loss: the experts' loads are equal by construction).
"""

from __future__ import annotations

import torch

from limoe.moe import losses
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

    def forward(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                num_groups: int = 1) -> RouterOutput:
        cfg = self.config
        logits_SE = self.clean_logits(x_Sd)
        cap, capacity_G = self.group_capacity(x_Sd.shape[0] // num_groups, valid_S, num_groups)
        logp_SE = torch.log_softmax(logits_SE, dim=-1)
        p_SE = logp_SE.exp()
        entropy_S = -(p_SE * logp_SE).sum(-1)
        routing = expert_choice(p_SE, cap, valid_S, num_groups, capacity_G)
        w_SM = losses.modality_weights(modality_S, valid_S, len(cfg.modalities))
        return RouterOutput(routing, self.shared_losses(logits_SE, p_SE, entropy_S, w_SM, num_groups), entropy_S)


def expert_choice(p_SE: torch.Tensor, capacity: int, valid_S: torch.Tensor | None = None, num_groups: int = 1,
                  capacity_G: torch.Tensor | None = None) -> Routing:
    """Each expert takes the `capacity` (or, with `capacity_G`, group g's limit) valid tokens of each group with
    the largest p(e | token); the Routing described in the module docstring. Static shapes, no host sync."""
    num_tokens, num_experts = p_SE.shape
    per_group = num_tokens // num_groups
    picks = min(capacity, per_group)
    # Padding scores -1, below every probability, so that a group's valid tokens always come first (the picks
    # are sorted): an expert's picks of valid tokens are its slots 0 .. n - 1. Equal scores: earliest token first.
    score_SE = p_SE.detach() if valid_S is None else torch.where(valid_S[:, None], p_SE.detach(), -1.0)
    token_GCE = top_k_lowest_first(score_SE.view(num_groups, per_group, num_experts), picks, dim=1)[1]
    rank_GCE = torch.arange(picks, device=p_SE.device)[None, :, None].expand_as(token_GCE)
    slot_GSE = torch.full((num_groups, per_group, num_experts), capacity, dtype=torch.long, device=p_SE.device)
    slot_SE = slot_GSE.scatter_(1, token_GCE, rank_GCE).view(num_tokens, num_experts)
    group_S = group_ids(num_tokens, num_groups, p_SE.device)
    kept_SE = slot_SE < (capacity if capacity_G is None else capacity_G[group_S][:, None])
    if valid_S is not None:
        kept_SE &= valid_S[:, None]
        slot_SE = torch.where(valid_S[:, None], slot_SE, -1)
    expert_SE = torch.arange(num_experts, device=p_SE.device).expand(num_tokens, num_experts)
    return Routing(expert_SE, slot_SE, p_SE, kept_SE, capacity, num_experts, num_groups, ranked=False)
