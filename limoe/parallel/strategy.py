"""How the ranks of a run hold and train the model: one `Strategy` the training loop calls, whatever the layout.

    strategy = make_strategy(cfg, world, device)   # limoe.parallel: the one for cfg.dist on this world
    strategy.shard(model)                       # on the meta device: swap or wrap the parameters
    strategy.load_part(block, full_state, prefix)  # fill this rank's share (limoe.parallel.materialise)
    runner = strategy.runner(model, compile)    # what the forward pass calls
    with strategy.accumulating(runner, last):   # a micro-batch's backward; gradients sync on the last
        ...backward()
    strategy.reduce_gradients(model)            # what the backward did not reduce
    norm = strategy.clip_grad_norm(model, max_norm)
    strategy.save(run_dir, step, model, optimizer, ...)            # collective: writes a checkpoint
    strategy.load_full_state(model, optimizer, checkpoint, opt_tensors, opt_meta)
    if world.main or strategy.collective_eval: evaluate(model)     # who evaluates

Implementations: `Strategy` itself (one process), `DataParallel` (DDP, the default for several ranks), and the
strategies whose ranks hold parts of the model (`sharded_strategy.py`): `expert_parallel.ExpertParallel` and
`fsdp.Fsdp` (FSDP2, with or without expert parallelism), whose every layout-dependent step reads one placement
table (`placement.py`). The first two write checkpoints in the single-process layout from rank 0; the sharded ones
have every rank write its shards (limoe/checkpoint/sharded.py) and evaluate together. A run resumes from either
kind of checkpoint under any strategy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from limoe import checkpoint as ckpt
from limoe.parallel.world import World


class Strategy:
    """One process: the model as built, gradients as the backward left them."""

    # False: rank 0 evaluates the model alone. True: every rank must run the evaluation (its layers' collectives
    # need all of them), on the same data.
    collective_eval = False

    def __init__(self, world: World, device: torch.device):
        self.world, self.device = world, device

    def shard(self, model: nn.Module) -> None:
        """Give this rank its share of `model`'s parameters (in place; the optimizer is built after)."""

    def load_part(self, module: nn.Module, full: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Copy single-process values `full` (some keys of `module.state_dict()`) into this rank's share of
        `module`, a part of the model `shard` has shared out, whose state-dict keys in the model start with
        `prefix`."""
        own = module.state_dict()
        for key, value in full.items():
            own[key].copy_(value)

    def runner(self, model: nn.Module, compile: bool) -> nn.Module:
        return torch.compile(model) if compile else model

    def accumulating(self, runner: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward: gradients are synchronised only when `last`."""
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        """After the last micro-batch's backward: every rank's gradients are the global batch's."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (of the whole, unsharded model); returns it before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def save(self, run_dir, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
             config_json: str, tokenizer, keep_last: int | None):
        """Write checkpoint `step` (collective); returns its folder on rank 0 (None elsewhere)."""
        if not self.world.main:
            return None
        return ckpt.save_checkpoint(run_dir, step, model, optimizer, state, config_json, tokenizer, keep_last)

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint,
                        opt_tensors: dict[str, torch.Tensor], opt_meta: dict) -> None:
        """Load a checkpoint (either kind) into this rank's share; `opt_tensors`: what `read_state` returned."""
        weights, opt_tensors = ckpt.full_tensors(checkpoint, opt_tensors)
        ckpt.load_weights(model, checkpoint, weights)
        ckpt.load_optimizer_state(optimizer, opt_tensors, opt_meta)


class DataParallel(Strategy):
    """Plain data parallelism: every rank holds the whole model; DDP averages gradients in the backward."""

    def runner(self, model: nn.Module, compile: bool) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(super().runner(model, compile), device_ids=ids)

    def accumulating(self, runner: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else runner.no_sync()
