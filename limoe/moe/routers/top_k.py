"""V-MoE's noisy top-k router with capacity and Batch Priority Routing, and LIMoE's per-modality aux losses.

Logits x W_r in float32; in training, noise of std noise_std / E is added, and the noisy softmax picks each
token's top-k experts and their gates (`limoe.moe.routing.route`), while the clean softmax feeds the losses
(importance, load, z, and per modality the local and the thresholded global entropy: limoe.moe.aux_losses).
"""

from __future__ import annotations

import torch

from limoe.moe import aux_losses
from limoe.moe.routers.base import LinearRouter, RouterOutput
from limoe.moe.routing import route


class TopKRouter(LinearRouter):
    """Each token picks its top-k experts; each expert takes at most C tokens of each group (the rest drop)."""

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_experts={c.num_experts}, k={c.k}, capacity_factor={c.capacity_factor}/"
                f"{c.eval_capacity_factor or c.capacity_factor} (train/eval), batch_priority={c.batch_priority}, "
                f"noise_std={c.noise_std}")

    @property
    def loss_names(self) -> tuple[str, ...]:
        return ("importance", "load") + self.shared_loss_names

    def capacity_for(self, num_tokens: int) -> int:
        """Slots per expert for a group of `num_tokens` tokens, with this mode's (train / eval) capacity factor."""
        return self.capacity_with_k(num_tokens, self.config.k)

    def forward(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                num_groups: int = 1) -> RouterOutput:
        cfg = self.config
        logits_SE, noisy_logits_SE = self.logits(x_Sd)
        cap, capacity_G = self.group_capacity(x_Sd.shape[0] // num_groups, valid_S, num_groups)
        routing = route(torch.softmax(noisy_logits_SE, dim=-1), cfg.k, cap, cfg.batch_priority, valid_S,
                        num_groups, capacity_G)
        logp_SE = torch.log_softmax(logits_SE, dim=-1)
        p_SE = logp_SE.exp()
        entropy_S = -(p_SE * logp_SE).sum(-1)
        w_SM = aux_losses.modality_weights(modality_S, valid_S, len(cfg.modalities))
        router_losses = self._aux_losses(logits_SE, noisy_logits_SE, p_SE, entropy_S, w_SM, num_groups)
        return RouterOutput(routing, router_losses, entropy_S, w_SM)

    def _aux_losses(self, logits_SE: torch.Tensor, noisy_logits_SE: torch.Tensor, p_SE: torch.Tensor,
                    entropy_S: torch.Tensor, w_SM: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
        """Each loss on each routing group, averaged over the groups that have tokens (of that modality)."""
        cfg = self.config
        logits_GSE, noisy_GSE, p_GSE, w_GSM = (
            t.view(num_groups, -1, *t.shape[1:]) for t in (logits_SE, noisy_logits_SE, p_SE, w_SM))
        w_GS = w_GSM.sum(-1)
        count_G = w_GS.sum(-1)
        out = {"importance": aux_losses.mean_over_groups(aux_losses.importance_loss(p_GSE, w_GS), count_G)}
        if self.training and cfg.noise_std > 0:
            load_G = aux_losses.load_loss(logits_GSE, noisy_GSE, cfg.noise_std / cfg.num_experts, cfg.k, w_GS)
            out["load"] = aux_losses.mean_over_groups(load_G, count_G)
        else:
            out["load"] = logits_SE.new_zeros(())
        out.update(self.shared_losses(logits_SE, p_SE, entropy_S, w_SM, num_groups))
        return out
