"""The checkpoint format: what a checkpoint folder holds, and readers of its single files.

Layout of one checkpoint (a folder `<run_dir>/checkpoints/step_<N>/`):

    model.safetensors      model weights (state_dict)
    optimizer.safetensors  optimizer state tensors ("state.<param idx>.<name>") and RNG state tensors ("rng.*")
    state.json             step, data position, optimizer scalars and param groups, Python RNG state, metrics
    config.json            the TrainConfig of the run
    model.json             the ModelConfig (so a checkpoint loads even if presets change)
    tokenizer.json         the tokenizer the model was trained with

A sharded checkpoint (expert-parallel and FSDP runs; `sharded.py`) has `sharded/` (every rank's shards) in place
of model.safetensors and the optimizer tensors; `optimizer.safetensors` then holds rank 0's RNG state alone.
Both kinds load everywhere.

Nothing is pickled: loading a checkpoint never executes code from it. A damaged file (bad JSON, truncated
safetensors, a corrupt tokenizer, non-finite weights) is a one-line CheckpointError, never a silent fallback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from limoe.errors import UserError

STEP_RE = re.compile(r"^step_(\d+)$")
BACKUP_PREFIX = ".old-"  # a checkpoint being replaced by a new save of the same step
BEST = "best"  # checkpoints/best: the step with the best held-out evaluation so far (mark_best)
LEGACY_KEYS = {"log_scale": "logit_scale"}  # weights renamed since: old checkpoints still load
FILES = ("model.safetensors", "optimizer.safetensors", "state.json", "config.json", "model.json",
         "tokenizer.json")
SHARDED_FOLDER = "sharded"
SHARDED_INDEX = f"{SHARDED_FOLDER}/index.json"
SHARDED_FILES = (SHARDED_INDEX, *(f for f in FILES if f != "model.safetensors"))  # the weights live in the shards


class CheckpointError(UserError, RuntimeError):
    """A missing, partial or incompatible checkpoint; the message is one line for the command line."""


def is_sharded(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARDED_FOLDER).is_dir()


def is_checkpoint(path: Path) -> bool:
    """A folder that is meant to be a checkpoint (complete or not)."""
    return (path / "model.safetensors").is_file() or is_sharded(path)


def missing_files(folder: Path) -> list[str]:
    """The files a complete checkpoint of its kind has and `folder` lacks."""
    return [f for f in (SHARDED_FILES if is_sharded(folder) else FILES) if not (folder / f).is_file()]


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read tensors ({e})") from None


def step_of(checkpoint: str | os.PathLike) -> int | None:
    """The training step of a checkpoint folder (its state.json), None when it has none (a sharded export...)."""
    state = Path(checkpoint) / "state.json"
    return read_json(state).get("step") if state.is_file() else None


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state.json, optimizer/RNG tensors) of a checkpoint folder."""
    path = Path(path)
    state = read_json(path / "state.json")
    position = state.get("data", {}).get("0") if isinstance(state.get("data"), dict) else None
    if not isinstance(state.get("step"), int) or not isinstance(position, dict) or "optimizer" not in state:
        raise CheckpointError(f"{path / 'state.json'}: not a training state (no step, data position or optimizer)")
    return state, read_tensors(path / "optimizer.safetensors")


def read_tokenizer(path: str | os.PathLike):
    from limoe.data.tokenizer import Tokenizer

    file = Path(path) / "tokenizer.json"
    try:
        return Tokenizer.load(file)
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
        raise CheckpointError(f"{file}: unreadable tokenizer ({str(e).splitlines()[0] if str(e) else e!r})") from None


def read_model_config(path: str | os.PathLike):
    from limoe.model.config import ModelConfig
    from limoe.moe.config import without_unread_options

    file = Path(path) / "model.json"
    try:
        saved = read_json(file)
        if isinstance(saved, dict) and isinstance(saved.get("moe"), dict):
            # Written before MoeConfig refused options a router does not read: they did nothing, so they go.
            saved["moe"] = without_unread_options(saved["moe"])
        return ModelConfig(**saved)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: unreadable model config ({e})") from None


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors holding a NaN or an infinity (a damaged file, or a run that diverged)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
