"""Checkpoints: safetensors weights + optimizer tensors, JSON for everything else, written atomically.

Layout of one checkpoint (a folder `<run_dir>/checkpoints/step_<N>/`):

    model.safetensors      model weights (state_dict)
    optimizer.safetensors  optimizer state tensors ("state.<param idx>.<name>") and RNG state tensors ("rng.*")
    state.json             step, data position, optimizer scalars and param groups, Python RNG state, metrics
    config.json            the TrainConfig of the run
    model.json             the ModelConfig (so a checkpoint loads even if presets change)
    tokenizer.json         the tokenizer the model was trained with

A sharded checkpoint (FSDP runs) has `sharded/` (every rank's shards, torch.distributed.checkpoint) instead of
model.safetensors and the optimizer tensors: limoe.checkpoint_sharded. Both kinds load everywhere.

Nothing is pickled: loading a checkpoint never executes code from it. A checkpoint is written into a
`.tmp-*` folder beside the others and renamed into place only when complete, so a crash (even SIGKILL)
during a write leaves the previous checkpoints intact and `latest` never resolves to a partial one. Saving a
step that already exists moves the old copy to `.old-step_<N>` first; until the new one is in place that
backup counts as the checkpoint, so there is never a moment without a complete copy.

Reading is as careful: a damaged file (bad JSON, truncated safetensors, a corrupt tokenizer, non-finite
weights) and a damaged newest checkpoint are one-line CheckpointErrors, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from limoe.errors import UserError

STEP_RE = re.compile(r"^step_(\d+)$")
BACKUP_PREFIX = ".old-"  # a checkpoint being replaced by a new save of the same step
BEST = "best"  # checkpoints/best: the step with the best held-out evaluation so far (mark_best)
LEGACY_KEYS = {"log_scale": "logit_scale"}  # weights renamed since: old checkpoints still load
FILES = ("model.safetensors", "optimizer.safetensors", "state.json", "config.json", "model.json",
         "tokenizer.json")


class CheckpointError(UserError, RuntimeError):
    """A missing, partial or incompatible checkpoint; the message is one line for the command line."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _missing(folder: Path) -> list[str]:
    from limoe.checkpoint_sharded import FILES as SHARDED, is_sharded

    return [f for f in (SHARDED if is_sharded(folder) else FILES) if not (folder / f).is_file()]


def _step_folders(root: Path) -> dict[int, Path]:
    """step -> folder: `step_<N>` when complete, else a complete `.old-step_<N>` backup, else the damaged one."""
    found: dict[int, Path] = {}
    for child in sorted(root.iterdir(), key=lambda c: c.name.startswith(BACKUP_PREFIX)):
        m = STEP_RE.match(child.name.removeprefix(BACKUP_PREFIX))
        if not (m and child.is_dir()):
            continue
        step = int(m.group(1))
        if step not in found or (_missing(found[step]) and not _missing(child)):
            found[step] = child
    return found


def list_checkpoints(run_dir: str | os.PathLike, damaged: bool = False) -> list[Path]:
    """Complete checkpoints of a run, oldest first; temporary folders are ignored, and incomplete step folders
    too unless `damaged` (then only they are listed)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return [path for _, path in sorted(_step_folders(root).items()) if bool(_missing(path)) == damaged]


def _latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; a newer damaged one is an error, not something to skip silently."""
    found = list_checkpoints(run_dir)
    broken = list_checkpoints(run_dir, damaged=True)
    if broken and (not found or broken[-1].name > found[-1].name):
        older = f"; the newest complete one is {found[-1]} (pass it explicitly)" if found else ""
        raise CheckpointError(f"{broken[-1]}: damaged checkpoint (missing {', '.join(_missing(broken[-1]))})"
                              f"{older}")
    return found[-1] if found else None


def resolve(path_or_latest: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """A checkpoint folder from a path (a checkpoint, a file in one, or a run directory: its latest) or "latest" of
    `run_dir`."""
    if str(path_or_latest) == "latest":
        if run_dir is None:
            raise CheckpointError("--resume latest needs a run directory")
        latest = _latest(Path(run_dir))
        if latest is None:
            raise CheckpointError(f"no checkpoint to resume from in {checkpoints_dir(run_dir)}")
        return latest
    path = Path(path_or_latest)
    if path.is_file() and _is_checkpoint(path.parent):  # a file in one (its model.safetensors, tokenizer.json)
        path = path.parent
    if path.is_dir() and _is_checkpoint(path):
        missing = _missing(path)
        if missing:
            raise CheckpointError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
        return path
    if path.is_dir() and (latest := _latest(path)):
        return latest
    if path.is_dir() and (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path}: run directory without a complete checkpoint")
    if path.exists():
        raise CheckpointError(f"{path}: not a checkpoint (expected a folder with model.safetensors)")
    raise CheckpointError(f"checkpoint not found: {path}")


def _is_checkpoint(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "sharded").is_dir()


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint folder belongs to (`<run>/checkpoints/step_<N>`)."""
    return checkpoint.resolve().parent.parent


# -- state that is not the model ------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of the torch, CUDA, NumPy and Python generators of this process."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors) and JSON scalars / param groups."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not fit this model: {e}") from None


# -- writing --------------------------------------------------------------------------------------------------
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


def _restore_backups(root: Path) -> None:
    """Put back a `.old-step_<N>` (or `.old-best`) left by a writer killed between its two renames (or drop it
    if superseded)."""
    for backup in root.glob(f"{BACKUP_PREFIX}*"):
        final = root / backup.name.removeprefix(BACKUP_PREFIX)
        if not final.exists() and not _missing(backup):
            os.replace(backup, final)
        elif final.exists() and not _missing(final):
            shutil.rmtree(backup, ignore_errors=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any], config_json: str,
                    tokenizer, keep_last: int | None = None, weights: dict[str, torch.Tensor] | None = None,
                    optimizer_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `step_<step>` atomically and delete all but the newest `keep_last` checkpoints.

    `weights` / `optimizer_tensors`: written instead of `model.state_dict()` / the optimizer's own tensors (an
    expert-parallel run passes the gathered single-process ones, so checkpoints do not depend on the EP size).
    """
    from safetensors.torch import save as st_save

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    prepare_root(root)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        weights = {k: v.detach().contiguous() for k, v in (weights or model.state_dict()).items()}
        _fsync_write(tmp / "model.safetensors", st_save(weights))
        tensors = {}
        if optimizer is not None:
            own, meta = optimizer_state(optimizer)
            tensors, state = (own if optimizer_tensors is None else optimizer_tensors), dict(state, optimizer=meta)
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
    _restore_backups(root)
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


def best_metrics(run_dir: str | os.PathLike) -> dict[str, float] | None:
    """The held-out metrics of a run's `checkpoints/best`, or None when it has none (yet)."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        _restore_backups(root)  # a writer killed while replacing `best` left it as `.old-best`
    best = root / BEST
    if _missing(best):
        return None
    return read_json(best / "state.json").get("metrics") or None


def write_metrics(path: str | os.PathLike, metrics: dict[str, float]) -> None:
    """Record evaluation metrics in a saved checkpoint's state.json (atomically: the checkpoint stays valid)."""
    file = Path(path) / "state.json"
    state = json.loads(file.read_text(encoding="utf-8"))
    state["metrics"] = metrics
    _replace_file(file, (json.dumps(state, indent=1) + "\n").encode())


# -- reading --------------------------------------------------------------------------------------------------
def step_of(checkpoint: str | os.PathLike) -> int | None:
    """The training step of a checkpoint folder (its state.json), None when it has none (a sharded export...)."""
    state = Path(checkpoint) / "state.json"
    return read_json(state).get("step") if state.is_file() else None


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read tensors ({e})") from None


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state.json, optimizer/RNG tensors) of a checkpoint folder."""
    path = Path(path)
    state = read_json(path / "state.json")
    position = state.get("data", {}).get("0") if isinstance(state.get("data"), dict) else None
    if not isinstance(state.get("step"), int) or not isinstance(position, dict) or "optimizer" not in state:
        raise CheckpointError(f"{path / 'state.json'}: not a training state (no step, data position or optimizer)")
    return state, _read_tensors(path / "optimizer.safetensors")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in the single-process layout, from either kind of checkpoint (sharded: read whole, here)."""
    from limoe.checkpoint_sharded import is_sharded, read_full

    return read_full(path, optimizer=False)[0] if is_sharded(path) else _read_tensors(Path(path) / "model.safetensors")


def read_tokenizer(path: str | os.PathLike):
    from limoe.data.tokenizer import Tokenizer

    file = Path(path) / "tokenizer.json"
    try:
        return Tokenizer.load(file)
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
        raise CheckpointError(f"{file}: unreadable tokenizer ({str(e).splitlines()[0] if str(e) else e!r})") from None


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


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors holding a NaN or an infinity (a damaged file, or a run that diverged)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def read_model_config(path: str | os.PathLike):
    from limoe.model.config import ModelConfig

    file = Path(path) / "model.json"
    try:
        return ModelConfig(**read_json(file))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: unreadable model config ({e})") from None


def load_checkpoint(path: str | os.PathLike = "latest", device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, TrainConfig) from a checkpoint folder or a run directory (its latest)."""
    from limoe.model.registry import build_model
    from limoe.train.config import TrainConfig

    path = resolve(path)
    model_config = read_model_config(path)
    try:
        config = TrainConfig.from_dict(read_json(path / "config.json"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable config ({e})") from None
    model = build_model(model_config)
    load_weights(model, path)
    tokenizer = read_tokenizer(path)
    return model.to(device).eval(), tokenizer, config
