"""One training step as a unit: the loop, the train-step benchmark and the tests all run `train_step`.

Order: zero the gradients -> per micro-batch (gradient accumulation): forward under autocast (`precision`: bf16
on CUDA, fp32 on CPU by default) -> compute_losses -> backward (the strategy synchronises gradients on the last)
-> reduce the gradients -> clip -> one host transfer of every loss term and the grad norm -> a non-finite loss
stops here, before the weights change -> AdamW -> clamp the logit scale. How the ranks share the model (DDP,
expert parallelism, FSDP) is the strategy's business (limoe.parallel.strategy); the learning rate is the caller's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from limoe.losses import compute_losses
from limoe.moe.stats import MoeStats


class NonFiniteLoss(RuntimeError):
    """The step's loss is NaN or infinite; raised before the optimizer step, so the weights are unchanged."""

    def __init__(self, value: float):
        super().__init__(f"non-finite loss ({value})")
        self.value = value


@dataclass
class StepResult:
    sums: dict[str, float]  # every loss term of compute_losses (mean over micro-batches), grad_norm when clipped
    stats: MoeStats | None  # routing counts summed over every MoE layer and micro-batch; None without MoE layers


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The forward pass's autocast for `precision` (TrainConfig.precision) on `device`."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_losses(model: nn.Module, batch, cfg, device: torch.device) -> tuple[dict[str, torch.Tensor], MoeStats | None]:
    """Forward one (micro-)batch: loss terms and the routing counts summed over every MoE layer and pass."""
    batch = batch.to(device, non_blocking=True)
    with autocast(device, cfg.precision):
        out = model(batch.images_B3HW, batch.ids_BT, valid_BT=~batch.padding_mask_BT)
        terms = compute_losses(out, cfg.loss)
    stats = None
    for record in out.aux:
        stats = record.stats if stats is None else stats + record.stats
    return terms, stats


def micro_batches(batch, parts: int) -> list:
    """`batch` cut into `parts` equal micro-batches (rows in order)."""
    n = len(batch) // parts
    return [batch.rows(i * n, (i + 1) * n) for i in range(parts)] if parts > 1 else [batch]


def train_step(runner: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, strategy, batch, cfg,
               device: torch.device, poison: bool = False) -> StepResult:
    """One optimizer step on `batch` (this rank's share of the global batch) with `cfg`'s accumulation, precision,
    losses and clipping. `runner`: the model as the strategy runs it (DDP-wrapped, compiled); `model`: the module
    itself. `poison` makes the loss NaN (to test what a diverged run does). Raises NonFiniteLoss."""
    accumulation = cfg.optim.accumulation
    optimizer.zero_grad(set_to_none=True)
    sums_on_device: dict[str, torch.Tensor] = {}  # detached, on the device: no host sync per term
    stats_total = None
    for i, micro in enumerate(micro_batches(batch, accumulation)):
        with strategy.accumulating(runner, last=i == accumulation - 1):
            terms, stats = step_losses(runner, micro, cfg, device)
            if poison:
                terms["total_loss"] = terms["total_loss"] * float("nan")
            (terms["total_loss"] / accumulation).backward()
        for name, value in terms.items():
            part = value.detach().float() / accumulation
            sums_on_device[name] = sums_on_device[name] + part if name in sums_on_device else part
        if stats is not None:
            stats_total = stats if stats_total is None else stats_total + stats
    strategy.reduce_gradients(model)
    if cfg.optim.grad_clip:
        sums_on_device["grad_norm"] = strategy.clip_grad_norm(model, cfg.optim.grad_clip)
    # One host transfer per step for every logged term and the grad norm; nothing steps before it.
    sums = dict(zip(sums_on_device, torch.stack([v.float() for v in sums_on_device.values()]).tolist()))
    if not math.isfinite(sums["total_loss"]):
        raise NonFiniteLoss(sums["total_loss"])
    optimizer.step()
    model.clamp_logit_scale()  # after the step, as open_clip: a clamp in forward would zero its gradient
    return StepResult(sums, stats_total)
