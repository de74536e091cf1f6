"""Auxiliary router losses (unweighted): V-MoE importance and load, LIMoE entropies, router z-loss.

Tokens are weighted instead of selected (w = 1 counts, 0 for padding or another modality), so one masked formula
serves every subset without data-dependent shapes. Per-modality losses take a weight matrix w_SM (one column per
modality) and return one value per modality. p_SE is the clean router softmax, entropy_S its row entropies.

Every function also takes a leading routing-group dimension ([G, S, E], [G, S], ...) and then returns one value
per group: as in V-MoE, each loss is computed on each group alone, and `mean_over_groups` averages the groups.
"""

from __future__ import annotations

import torch


def _cv_squared(values_E: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over the last dimension, with the population std; 0 when all values are 0."""
    return values_E.var(dim=-1, correction=0) / values_E.mean(-1).square().clamp_min(1e-20)


def _token_sum(w_S: torch.Tensor, x_SE: torch.Tensor) -> torch.Tensor:
    """sum_s w_s x_s: [..., S] x [..., S, E] -> [..., E]."""
    return (w_S[..., None] * x_SE).sum(-2)


def modality_weights(modality_S: torch.Tensor, valid_S: torch.Tensor | None, num_modalities: int) -> torch.Tensor:
    """Each token's modality as a one-hot weight row, a zero row for padding: [S] -> [S, M] float."""
    # A comparison, not F.one_hot: one_hot validates its input with a host sync on accelerators.
    w_SM = (modality_S[:, None] == torch.arange(num_modalities, device=modality_S.device)).float()
    return w_SM * valid_S[:, None] if valid_S is not None else w_SM


def entropy(logits_SE: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row: [S, E] -> [S]."""
    logp_SE = torch.log_softmax(logits_SE, dim=-1)
    return -(logp_SE.exp() * logp_SE).sum(-1)


def importance_loss(p_SE: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """Imp_e = sum_x p(e|x); loss = (std_e Imp / mean_e Imp)^2."""
    return _cv_squared(_token_sum(w_S, p_SE))


def load_loss(logits_SE: torch.Tensor, noisy_logits_SE: torch.Tensor, noise_std: float, k: int,
              w_S: torch.Tensor) -> torch.Tensor:
    """P_e = mean_x P(logit_e(x) + fresh noise beats the k-th largest noisy logit of x); loss = cv(P)^2.

    `noise_std` is the std of the noise actually added (V-MoE: noise_std / E).
    """
    threshold_S = noisy_logits_SE.topk(k, dim=-1).values[..., -1]
    prob_SE = 1.0 - torch.special.ndtr((threshold_S[..., None] - logits_SE) / noise_std)
    return _cv_squared(_token_sum(w_S, prob_SE) / w_S.sum(-1, keepdim=True).clamp_min(1.0))


def local_entropy_loss(entropy_S: torch.Tensor, w_SM: torch.Tensor) -> torch.Tensor:
    """LIMoE Omega_local per modality: mean entropy of its tokens' routing distributions. -> [M]"""
    return _token_sum(entropy_S, w_SM) / w_SM.sum(-2).clamp_min(1.0)


def global_entropy_loss(p_SE: torch.Tensor, w_SM: torch.Tensor, min_experts_M: torch.Tensor) -> torch.Tensor:
    """LIMoE thresholded Omega_global per modality: max(0, log(S_m) - H(mean_x p(.|x))); 0 for no tokens. -> [M]

    H(p~) <= log(S_m) is penalised, so modality m must spread over at least S_m experts on average but is free
    to use fewer than all E.
    """
    count_M = w_SM.sum(-2)
    mean_p_ME = (w_SM.transpose(-1, -2) @ p_SE) / count_M.clamp_min(1.0)[..., None]
    # Clamp inside the log, not xlogy: an absent modality has p~ = 0, where xlogy's gradient is 0 * inf = NaN.
    marginal_entropy_M = -(mean_p_ME * mean_p_ME.clamp_min(1e-20).log()).sum(-1)
    return torch.clamp(min_experts_M.log() - marginal_entropy_M, min=0.0) * (count_M > 0)


def z_loss(logits_SE: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean_x logsumexp(logits(x))^2."""
    return (w_S * torch.logsumexp(logits_SE, dim=-1).square()).sum(-1) / w_S.sum(-1).clamp_min(1.0)


def mean_over_groups(loss_G: torch.Tensor, count_G: torch.Tensor) -> torch.Tensor:
    """Mean over the groups that have tokens to count ([G] or [G, M] -> [] or [M]); 0 if none has."""
    present_G = (count_G > 0).to(loss_G.dtype)
    return (loss_G * present_G).sum(0) / present_G.sum(0).clamp_min(1.0)
