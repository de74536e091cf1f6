"""Output paths checked before the work that fills them: a read-only folder or a typo is found in a second, not
after minutes of evaluation, and is one line naming the path the user gave."""

from __future__ import annotations

import os
from pathlib import Path

from limoe.errors import UserError


class OutputError(UserError):
    """An output path that cannot be written."""


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | os.PathLike, option: str = "--output") -> Path:
    """A file that can be created or replaced: its folder exists and is writable, and it is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: {folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"{option} {path}: not writable (permission denied)")
    return path


def check_output_folder(path: str | os.PathLike, option: str = "--out", new: bool = False) -> Path:
    """A folder that exists and is writable, or can be made (its nearest existing parent is a writable folder).
    `new`: it must not exist yet."""
    path = Path(path)
    if path.exists() and (new or not path.is_dir()):
        raise OutputError(f"{option} {path} exists{'' if path.is_dir() else ' and is not a folder'}: give a new "
                          f"folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"{option} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: {base} is not writable (permission denied)")
    return path
