"""Built datasets in the cache folder (the built-in set, the corpus): written atomically, checked when reused,
and rebuilt when damaged.

A build writes into a temporary folder beside its final one and renames it into place, so a crash or a race
never leaves half a dataset; the manifest records the size of every top-level file (the CSVs that training parses),
so a truncated or deleted one is found when the cache is reused and the folder is built again, instead of failing
every run. A build's temporary folder is locked while it is written; one left by a killed build is removed by the
next build.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from limoe.data.stats import DataError
from limoe.locks import LOCK_FILE, FolderInUse, folder_lock

MANIFEST = "manifest.json"
STALE_SECONDS = 60  # a temporary folder unlocked and this old is a killed build's (a live one holds its lock)


def _top_level_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in (MANIFEST, LOCK_FILE)}


def is_built(final: Path, quiet: bool = False) -> bool:
    """Whether `final` holds a finished, undamaged build: a readable manifest, and the recorded top-level files at
    their recorded sizes. Says why when it does not (and the folder exists)."""
    problem = None
    try:
        manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
        recorded = manifest.get("files", {}) if isinstance(manifest, dict) else None
        if recorded is None:
            problem = f"{MANIFEST} is not a manifest"
        else:
            actual = {name: (final / name).stat().st_size if (final / name).is_file() else None for name in recorded}
            wrong = [name for name, size in recorded.items() if actual[name] != size]
            if wrong:
                name = wrong[0]
                problem = (f"{name} is missing" if actual[name] is None else
                           f"{name} has {actual[name]} bytes, {recorded[name]} when built")
    except FileNotFoundError:
        if not final.exists():
            return False
        problem = f"{MANIFEST} is missing (an interrupted build, or deleted)"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"{MANIFEST} is unreadable ({e})"
    if problem and not quiet:
        print(f"limoe: the cached data {final} is damaged: {problem}; building it again", file=sys.stderr,
              flush=True)
    return problem is None


def _remove_stale_builds(final: Path) -> None:
    """Temporary folders of builds that were killed (or replaced folders a crash left behind)."""
    for pattern in (".tmp-*", ".old-*"):
        for stale in final.parent.glob(glob.escape(final.name) + pattern):
            try:
                if time.time() - stale.stat().st_mtime < STALE_SECONDS:
                    continue
                with folder_lock(stale, "a data build"):
                    shutil.rmtree(stale, ignore_errors=True)
            except (FolderInUse, OSError):  # being built right now, or not ours to remove
                continue


def write_atomically(final: Path, write: Callable[[Path], dict], force: bool = False) -> dict:
    """Run `write(folder)` on a folder beside `final`, then rename it into place, replacing a damaged (or, with
    `force`, any) earlier build. When two builds race, the first to finish wins: they are identical."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            with folder_lock(tmp, "a data build"):
                manifest = write(tmp)
                manifest["files"] = _top_level_files(tmp)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
                (tmp / LOCK_FILE).unlink()
                _move_into_place(tmp, final, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:  # a read-only or full cache: name the cache and the way out, not a traceback
        raise DataError(f"cannot write the data cache {final.parent}: {e.strerror or e}; free space there, or set "
                        f"LIMOE_CACHE (or data.cache_dir) to another folder") from None
    return manifest


def _move_into_place(tmp: Path, final: Path, force: bool) -> None:
    old = None
    if final.exists() and (force or not is_built(final, quiet=True)):
        # Moved aside, not deleted first: a run streaming from the old build misses its files only between
        # the two renames (the new build has the same files at the same paths).
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
