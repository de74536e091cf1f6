"""Skip accounting: bad samples are dropped and counted by reason, then summarised in one warning.

A long run must never crash on one bad file, but silently dropping data hides real problems, so every
skip is counted under a fixed reason and the loader prints a single summary line per pass.
"""

from __future__ import annotations

import warnings

import torch

from limoe.errors import UserError

# Fixed order: the index into the shared counter tensor. Add new reasons at the end.
REASONS: tuple[str, ...] = (
    "missing_file",      # path in an index that does not exist
    "empty_file",        # zero-byte file
    "not_an_image",      # bytes Pillow cannot identify
    "corrupt_image",     # identified but fails to decode (truncated, bad data)
    "oversized_image",   # more pixels than ImageConfig.max_pixels
    "empty_caption",     # empty or whitespace-only caption
    "bad_encoding",      # caption bytes that are not UTF-8
    "bad_shard",         # a tar shard that is truncated or unreadable part-way
    "incomplete_sample", # a shard sample that lacks an image or a caption (or class label)
    "bad_row",           # a CSV/TSV row with the wrong number of fields or broken quoting
    "not_a_file",        # a path that names no regular file (a FIFO, a device), a symlink loop, no permission
    "oversized_file",    # a file larger than stream.MAX_FILE_BYTES
    "bad_label",         # a class label that is not an integer index of the classes
)


class SkipError(Exception):
    """Raised by a decode step to say 'skip this sample' with one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DataError(UserError, ValueError):
    """A data source that cannot be used at all: a wrong path, column or pattern, no valid sample, too few
    samples for one batch. One line naming the source and what to do; the CLI prints it without a traceback.

    A ValueError so code that already catches ValueError keeps working; bad *samples* are never a
    DataError (they are skipped and counted), only a source that cannot give a single batch.
    """

    def __str__(self) -> str:  # KeyError would quote the message; every subclass prints it as is
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file, folder or shard pattern that names nothing (also a FileNotFoundError, as it used to be)."""


class MissingColumnError(DataError, KeyError):
    """A CSV without the configured column (also a KeyError, as it used to be)."""


class NoValidSamplesError(DataError):
    """A data source produced no usable sample at all: almost always a wrong path or column."""


class SkipCounter:
    """Per-worker skip counts in shared memory.

    counts_per_worker [workers + 1, reasons] has one row per DataLoader worker (+1 for the main process, row 0),
    one column per reason. Each process writes only its own row, so increments never race; the parent sums rows.
    The tensor is put in shared memory so worker processes (fork or spawn) write where the parent reads.
    """

    def __init__(self, max_workers: int = 64):
        self.counts_per_worker = torch.zeros(max_workers + 1, len(REASONS), dtype=torch.int64).share_memory_()
        self.yielded_per_worker = torch.zeros(max_workers + 1, dtype=torch.int64).share_memory_()  # [workers + 1]

    def _row(self) -> int:
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else info.id + 1
        if row >= self.counts_per_worker.shape[0]:
            raise RuntimeError(f"more DataLoader workers than SkipCounter rows ({self.counts_per_worker.shape[0] - 1})")
        return row

    def skip(self, reason: str, n: int = 1) -> None:
        self.counts_per_worker[self._row(), REASONS.index(reason)] += n

    def ok(self) -> None:
        self.yielded_per_worker[self._row()] += 1

    def reset(self) -> None:
        self.counts_per_worker.zero_()
        self.yielded_per_worker.zero_()

    def totals(self) -> dict[str, int]:
        """Skips per reason summed over all workers; only reasons that occurred."""
        per_reason = self.counts_per_worker.sum(0).tolist()
        return {r: int(c) for r, c in zip(REASONS, per_reason) if c}

    @property
    def yielded(self) -> int:
        return int(self.yielded_per_worker.sum())


def format_skips(name: str, skips: dict[str, int], kept: int | None = None) -> str:
    parts = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(skips.items()))
    kept_txt = f" (kept {kept})" if kept is not None else ""
    return f"{name}: skipped {sum(skips.values())} bad samples{kept_txt}: {parts}"


def warn_skips(name: str, skips: dict[str, int], kept: int | None = None) -> None:
    """One warning for a whole pass; nothing when there was nothing to skip."""
    if skips:
        warnings.warn(format_skips(name, skips, kept), stacklevel=2)
