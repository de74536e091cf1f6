"""AdamW with weight-decay exclusions, and the learning-rate schedule as a pure function of the step.

The schedule is a function (not a torch LR scheduler object) so that the only scheduler state a checkpoint
needs is the step number, and resuming can never drift from the straight run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from limoe.train.config import OptimConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm scales, token / position embeddings, learned pooling probes and the temperature are not
    decayed: decaying them shrinks quantities that have no reason to be small (CLIP and ViT practice). Weight
    matrices (linear, patch conv, router, stacked expert weights) are."""
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim <= 1 or leaf == "bias" or leaf.startswith("b_"):  # incl. stacked expert biases b_in_Eh
        return True
    if leaf.startswith(("pos", "probe")) or "norm" in name:
        return True
    return isinstance(param, nn.Parameter) and name.endswith("tok.weight")  # token embedding table


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices (linear / conv / expert weights) and everything else."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append((name, param))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine / rsqrt / constant."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "rsqrt":
        timescale = cfg.rsqrt_timescale or max(warmup, 1)
        return cfg.lr * math.sqrt(timescale / max(step + 1, timescale))
    # cosine from lr at the end of warmup to min_lr_ratio * lr at the last step
    span = max(total_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
