"""A checkpoint's weights (either kind) in the single-process layout, checked to fit a model before it loads them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from limoe.checkpoint.format import LEGACY_KEYS, CheckpointError, is_sharded, non_finite, read_tensors


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in the single-process layout, from either kind of checkpoint (sharded: read whole, here)."""
    if not is_sharded(path):
        return read_tensors(Path(path) / "model.safetensors")
    from limoe.checkpoint.sharded import read_full  # torch.distributed.checkpoint: imported when needed (~1 s)

    return read_full(path, optimizer=False)[0]


def full_tensors(path: str | os.PathLike, optimizer_tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, optimizer and RNG tensors) of any checkpoint in the single-process layout; `optimizer_tensors`:
    those `read_state` returned."""
    if not is_sharded(path):
        return read_weights(path), optimizer_tensors
    from limoe.checkpoint.sharded import read_full

    weights, optimizer = read_full(path)
    return weights, {**optimizer_tensors, **optimizer}


def load_weights(model: nn.Module, path: str | os.PathLike,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """Load a checkpoint's weights (or `weights`, e.g. already sliced for an expert-parallel rank)."""
    model.load_state_dict(checked_weights(model, path, weights))


def checked_weights(model: nn.Module, path: str | os.PathLike,
                    weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's weights (or `weights`) under the model's key names, checked to fit `model` (keys, shapes)
    and to be finite: a CheckpointError naming the file otherwise."""
    file = Path(path) / "model.safetensors"
    weights = read_weights(path) if weights is None else weights
    weights = {LEGACY_KEYS.get(k, k): v for k, v in weights.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {shapes[0]} is {tuple(weights[shapes[0]].shape)}, model has "
                       f"{tuple(own[shapes[0]].shape)}")
        raise CheckpointError(f"{file}: incompatible with this model ({detail})")
    # NaN/inf weights give a model whose scores are all equal: evaluation would report nonsense, not fail.
    broken = non_finite(weights)
    if broken:
        raise CheckpointError(f"{file}: non-finite values in {len(broken)} tensors (first: {broken[0]}); "
                              f"the checkpoint is unusable")
    return weights
