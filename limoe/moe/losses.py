"""Auxiliary router losses (unweighted): V-MoE importance and load, LIMoE entropies, router z-loss.

Each takes float32 router logits [S, E] and a float token weight w_S (1 for tokens that count, 0 for padding or
for tokens of another modality), so one masked formula serves every subset without dynamic shapes.
"""

from __future__ import annotations

import math

import torch


def _cv_squared(values_E: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 with the population std; 0 when all values are 0."""
    return values_E.var(correction=0) / values_E.mean().square().clamp_min(1e-20)


def entropy(logits_SE: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row: [S, E] -> [S]."""
    logp_SE = torch.log_softmax(logits_SE, dim=-1)
    return -(logp_SE.exp() * logp_SE).sum(-1)


def importance_loss(logits_SE: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """Imp_e = sum_x p(e|x) over the clean softmax; loss = (std_e Imp / mean_e Imp)^2."""
    importance_E = (torch.softmax(logits_SE, dim=-1) * w_S[:, None]).sum(0)
    return _cv_squared(importance_E)


def load_loss(logits_SE: torch.Tensor, noisy_logits_SE: torch.Tensor, noise_std: float, k: int,
              w_S: torch.Tensor) -> torch.Tensor:
    """P_e = mean_x P(logit_e(x) + fresh noise beats the k-th largest noisy logit of x); loss = cv(P)^2.

    `noise_std` is the std of the noise actually added (V-MoE: noise_std / E).
    """
    threshold_S = noisy_logits_SE.topk(k, dim=-1).values[:, -1]
    prob_SE = 1.0 - torch.special.ndtr((threshold_S[:, None] - logits_SE) / noise_std)
    load_E = (prob_SE * w_S[:, None]).sum(0) / w_S.sum().clamp_min(1.0)
    return _cv_squared(load_E)


def local_entropy_loss(logits_SE: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """LIMoE Omega_local: mean over the weighted tokens of the entropy of their routing distribution."""
    return (entropy(logits_SE) * w_S).sum() / w_S.sum().clamp_min(1.0)


def global_entropy_loss(logits_SE: torch.Tensor, w_S: torch.Tensor, min_experts: float) -> torch.Tensor:
    """LIMoE thresholded Omega_global: max(0, log(min_experts) - H(mean_x p(.|x))), 0 for an empty set.

    H(p~) <= log(min_experts) is penalised, so the modality must spread over at least `min_experts` experts
    on average but is free to use fewer than all E.
    """
    count = w_S.sum()
    mean_p_E = (torch.softmax(logits_SE, dim=-1) * w_S[:, None]).sum(0) / count.clamp_min(1.0)
    marginal_entropy = -torch.xlogy(mean_p_E, mean_p_E).sum()
    loss = torch.clamp(math.log(min_experts) - marginal_entropy, min=0.0)
    return loss * (count > 0)


def z_loss(logits_SE: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean_x logsumexp(logits(x))^2."""
    return (torch.logsumexp(logits_SE, dim=-1).square() * w_S).sum() / w_S.sum().clamp_min(1.0)
