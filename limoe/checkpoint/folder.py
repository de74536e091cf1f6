"""A run's checkpoints folder: which checkpoints it holds, which one a path or "latest" means, and its best.

A `.old-step_<N>` backup (left while a step is saved again) counts as that step until the new copy is in place,
and a damaged newest checkpoint is an error rather than something skipped silently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from limoe.checkpoint.format import (BACKUP_PREFIX, BEST, STEP_RE, CheckpointError, is_checkpoint, missing_files,
                                     read_json)


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint folder belongs to (`<run>/checkpoints/step_<N>`)."""
    return checkpoint.resolve().parent.parent


def _step_folders(root: Path) -> dict[int, Path]:
    """step -> folder: `step_<N>` when complete, else a complete `.old-step_<N>` backup, else the damaged one."""
    found: dict[int, Path] = {}
    for child in sorted(root.iterdir(), key=lambda c: c.name.startswith(BACKUP_PREFIX)):
        m = STEP_RE.match(child.name.removeprefix(BACKUP_PREFIX))
        if not (m and child.is_dir()):
            continue
        step = int(m.group(1))
        if step not in found or (missing_files(found[step]) and not missing_files(child)):
            found[step] = child
    return found


def list_checkpoints(run_dir: str | os.PathLike, damaged: bool = False) -> list[Path]:
    """Complete checkpoints of a run, oldest first; temporary folders are ignored, and incomplete step folders
    too unless `damaged` (then only they are listed)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return [path for _, path in sorted(_step_folders(root).items()) if bool(missing_files(path)) == damaged]


def _latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; a newer damaged one is an error, not something to skip silently."""
    found = list_checkpoints(run_dir)
    broken = list_checkpoints(run_dir, damaged=True)
    if broken and (not found or broken[-1].name > found[-1].name):
        older = f"; the newest complete one is {found[-1]} (pass it explicitly)" if found else ""
        raise CheckpointError(f"{broken[-1]}: damaged checkpoint (missing {', '.join(missing_files(broken[-1]))})"
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
    if path.is_file() and is_checkpoint(path.parent):  # a file in one (its model.safetensors, tokenizer.json)
        path = path.parent
    if path.is_dir() and is_checkpoint(path):
        missing = missing_files(path)
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


def restore_backups(root: Path) -> None:
    """Put back a `.old-step_<N>` (or `.old-best`) left by a writer killed between its two renames (or drop it
    if superseded)."""
    for backup in root.glob(f"{BACKUP_PREFIX}*"):
        final = root / backup.name.removeprefix(BACKUP_PREFIX)
        if not final.exists() and not missing_files(backup):
            os.replace(backup, final)
        elif final.exists() and not missing_files(final):
            shutil.rmtree(backup, ignore_errors=True)


def best_metrics(run_dir: str | os.PathLike) -> dict[str, float] | None:
    """The held-out metrics of a run's `checkpoints/best`, or None when it has none (yet)."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        restore_backups(root)  # a writer killed while replacing `best` left it as `.old-best`
    best = root / BEST
    if missing_files(best):
        return None
    return read_json(best / "state.json").get("metrics") or None
