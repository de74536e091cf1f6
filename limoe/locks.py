"""One writer per folder: a run folder, or a reproduction's output, is locked while a process works in it.

Two `limoe train --run-dir same` at once would interleave their checkpoints and metrics.jsonl; two reproductions
on one `--out` would train every run twice. The lock is an flock on `<folder>/.lock`, so the kernel releases it
when its holder exits in any way (kill -9 included): a stale lock never needs removing by hand.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator

from limoe.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; folders go unlocked there
    fcntl = None

LOCK_FILE = ".lock"


class FolderInUse(UserError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, holder: str) -> Iterator[None]:
    """Hold `folder`'s lock (creating the folder) for the duration, or raise FolderInUse at once.

    `holder` names what holds it ("limoe train"), for the message another process gets."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            raise FolderInUse(f"{folder} is in use by {other}; wait for it to finish, or use another folder") \
                from None
        except OSError as e:  # a file system without locks (some network mounts): work unlocked, and say so
            warnings.warn(f"{folder}: cannot lock ({e.strerror}); a second process could work in it at once",
                          stacklevel=3)
            yield
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder} (pid {os.getpid()})\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
