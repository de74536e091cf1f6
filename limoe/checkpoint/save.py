"""Writing checkpoints, atomically.

A checkpoint is written into a `.tmp-*` folder beside the others and renamed into place only when complete, so a
crash (even SIGKILL) during a write leaves the previous checkpoints intact and `latest` never resolves to a
partial one. Saving a step that already exists moves the old copy to `.old-step_<N>` first; until the new one is
in place that backup counts as the checkpoint, so there is never a moment without a complete copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from limoe.checkpoint.folder import checkpoints_dir, list_checkpoints, restore_backups
from limoe.checkpoint.format import BACKUP_PREFIX, BEST
from limoe.checkpoint.state import optimizer_state, rng_state


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_file(path: Path, data: bytes) -> None:
    """Write a file atomically: a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".tmp-{path.name}")
    _fsync_write(tmp, data)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any], config_json: str,
                    tokenizer, keep_last: int | None = None) -> Path:
    """Write `step_<step>` (the model's weights, the optimizer's state, `state` and the run's files) atomically
    and delete all but the newest `keep_last` checkpoints."""
    from safetensors.torch import save as st_save

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    prepare_root(root)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        _fsync_write(tmp / "model.safetensors", st_save(weights))
        tensors = {}
        if optimizer is not None:
            tensors, meta = optimizer_state(optimizer)
            state = dict(state, optimizer=meta)
        write_metadata(tmp, tensors, state, config_json, model.config, tokenizer)
        swap_in(tmp, final)  # the same step saved again (e.g. resuming a finished run): a copy throughout
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        prune(run_dir, keep_last)
    return final


def prepare_root(root: Path) -> None:
    """Before writing into a checkpoints folder: finish or undo what a killed writer left."""
    restore_backups(root)
    for stale in root.glob(".tmp-*"):  # left by a killed writer; one writer per run, so never in use
        shutil.rmtree(stale, ignore_errors=True)


def write_metadata(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], config_json: str,
                   model_config, tokenizer) -> None:
    """Everything of a checkpoint but the weights: `tensors` and this process's RNG state in
    optimizer.safetensors, then config, model config, tokenizer and state (with the RNG's JSON part)."""
    from safetensors.torch import save as st_save

    rng, meta = rng_state()
    _fsync_write(folder / "optimizer.safetensors", st_save({**rng, **tensors}))
    _fsync_write(folder / "config.json", config_json.encode())
    model_json = json.dumps(dataclasses.asdict(model_config), indent=2, sort_keys=True) + "\n"
    _fsync_write(folder / "model.json", model_json.encode())
    tokenizer.save(folder / "tokenizer.json")
    _fsync_write(folder / "state.json", (json.dumps(dict(state, rng=meta), indent=1) + "\n").encode())


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def swap_in(tmp: Path, final: Path) -> None:
    """Move a finished folder to `final`; an existing `final` stays as `.old-<name>` until the new one is in."""
    if final.exists():
        backup = final.with_name(f"{BACKUP_PREFIX}{final.name}")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final, backup)
        os.replace(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, final)


def mark_best(checkpoint: Path, metrics: dict[str, float]) -> Path:
    """Make `checkpoints/best` a copy of `checkpoint` with `metrics` in its state.json, atomically.

    The files are hard links (a copy where the file system has none): free, and safe, because every later write
    to either folder replaces a file rather than changing it. Pruning old steps then never removes the best.
    """
    root = checkpoint.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{BEST}-", dir=root))
    try:
        for src in (f for f in checkpoint.rglob("*") if f.is_file()):  # sharded checkpoints have a subfolder
            dst = tmp / src.relative_to(checkpoint)
            dst.parent.mkdir(exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        write_metrics(tmp, metrics)
        swap_in(tmp, root / BEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / BEST


def write_metrics(path: str | os.PathLike, metrics: dict[str, float]) -> None:
    """Record evaluation metrics in a saved checkpoint's state.json (atomically: the checkpoint stays valid)."""
    file = Path(path) / "state.json"
    state = json.loads(file.read_text(encoding="utf-8"))
    state["metrics"] = metrics
    _replace_file(file, (json.dumps(state, indent=1) + "\n").encode())
