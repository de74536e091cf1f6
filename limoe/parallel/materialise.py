"""A run's model, built without the whole of it on any rank: the structure on the meta device, shared out by the
strategy, allocated shard by shard on the device, then filled by replaying `build_model` in host memory.

The replay is the same constructor with the same global RNG, so it draws the same numbers in the same order and
every layout starts from exactly the weights one process builds with the same seed. It never holds more than the
parts outside the blocks plus one block: a module-registration hook hands each block to the strategy (which keeps
this rank's share of it) the moment the block is complete, then frees it. The numbers left in the RNG are the same
as after `build_model`, so data order and router noise are unchanged too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from limoe.model.block import Block
from limoe.model.config import ModelConfig
from limoe.model.registry import build_model


def build_for(strategy, config: ModelConfig, device: torch.device) -> nn.Module:
    """`build_model(config)` as `strategy` shares it out over the ranks (`strategy.shard`), on `device`."""
    with torch.device("meta"):
        model = build_model(config)
    strategy.shard(model)  # before anything is allocated: swapped layers and FSDP shards are meta tensors too
    model.to_empty(device=device)
    blocks = iter([(name, m) for name, m in model.named_modules() if isinstance(m, Block)])  # construction order
    written: set[str] = set()

    def fill(prefix: str, module: nn.Module, full: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            strategy.load_part(module, full, prefix)
        written.update(f"{prefix}{key}" for key in full)

    def hand_over(parent: nn.Module, name: str, child: nn.Module) -> None:
        if isinstance(child, Block):  # complete: its constructor has returned, and nothing touches it later
            target_name, target = next(blocks)
            fill(f"{target_name}.", target, child.state_dict())
            child.to_empty(device="meta")  # frees it

    handle = register_module_module_registration_hook(hand_over)
    try:
        replay = build_model(config)
    finally:
        handle.remove()
    fill("", model, {k: v for k, v in replay.state_dict().items() if not v.is_meta})
    missing = set(model.state_dict()) - written
    if missing:  # a tensor nobody filled would start as whatever memory to_empty found
        raise RuntimeError(f"materialising the model left {sorted(missing)[:3]} unset")
    return model
