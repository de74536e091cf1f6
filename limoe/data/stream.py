"""The one streaming dataset every format builds on: split, shuffle, decode, skip bad samples, yield.

Every process that reads data (distributed rank x DataLoader worker) is one "part" of `parts`; a format
only has to list its records for a given part. Map-like formats (CSV, image folders) deal a seeded global
permutation of their indices round-robin, so across all parts every sample is read exactly once per epoch.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from limoe.data.stats import NoValidSamplesError, SkipCounter, SkipError, warn_skips
from limoe.data.transforms import ImageConfig, ImageTransform


@dataclass
class Record:
    """One raw sample before decoding: image bytes (or a function that reads them) and a target."""

    key: str
    image: bytes | Callable[[], bytes]
    target: Any  # raw caption (str or bytes) for pairs, int class index for classification


@dataclass
class DataPosition:
    """Where a seeded stream of batches is: every epoch's order follows from (seed, epoch), so this is all a
    resumed run needs."""

    epoch: int = 0
    batch: int = 0  # batches of this epoch already consumed


def clean_caption(raw: str | bytes | None) -> str:
    """Raw caption -> stripped str, or SkipError('bad_encoding' | 'empty_caption' | 'bad_row').

    The one cleaning step for training, evaluation and tokenizer training alike, so the tokenizer is
    trained on exactly the captions the model will read.
    """
    if raw is None:  # a CSV row that could not be parsed (kept in the index so every pass counts it)
        raise SkipError("bad_row")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SkipError("bad_encoding") from None
    else:
        try:
            # Text files are read with errors="surrogateescape" (undecodable bytes become lone surrogates)
            # and JSON may escape lone surrogates: neither can be encoded, so the tokenizer would fail on it.
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise SkipError("bad_encoding") from None
    # str.split() also folds newlines/tabs, which would break CSV/TSV round trips; a BOM at the start of a
    # text file is not part of the caption.
    text = " ".join(raw.removeprefix("\ufeff").split())
    if not text:
        raise SkipError("empty_caption")
    return text


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from several ints (seed, epoch, part); no Python hash() randomisation."""
    s = 0x9E3779B97F4A7C15
    for p in parts:
        s = (s ^ (int(p) + 0x9E3779B97F4A7C15 + (s << 6) + (s >> 2))) & 0xFFFFFFFFFFFFFFFF
    return s & 0x7FFFFFFFFFFFFFFF


def current_part(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(part, parts) of the calling process: rank-major, worker-minor."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world_size * workers


def deal_indices(n: int, part: int, parts: int, gen: torch.Generator | None, drop_uneven: bool) -> list[int]:
    """This part's share of range(n): a (seeded) permutation dealt round-robin.

    drop_uneven trims the permutation to a multiple of `parts` so every rank/worker yields the same
    count (DDP needs equal steps per rank); the dropped tail changes every epoch when shuffled.
    """
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    if drop_uneven:
        order = order[: n - n % parts]
    return order[part::parts].tolist()


class SampleStream(IterableDataset):
    """Base class: yields (image [3,S,S] float tensor, target) for the records of this process's part.

    Subclasses implement `records(part, parts, gen)` and, if their target is not a caption,
    `decode_target`. Bad samples are skipped and counted in `self.skips` (shared with workers).
    """

    target_kind = "caption"  # or "label" (int class index)

    def __init__(
        self,
        name: str,
        image: ImageConfig | None = None,
        train: bool = False,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_uneven: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.name = name
        self.transform = ImageTransform(image, train=train)
        self.shuffle = train if shuffle is None else shuffle
        self.seed = seed
        self.epoch = 0
        self.drop_uneven = drop_uneven
        self.rank, self.world_size = rank, world_size
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (before the DataLoader starts its workers) for a new shuffle."""
        self.epoch = epoch

    # --- to implement -------------------------------------------------------------------------------
    def records(self, part: int, parts: int, gen: torch.Generator | None) -> Iterator[Record]:
        raise NotImplementedError

    def decode_target(self, raw: Any) -> Any:
        return clean_caption(raw)

    # --- shared machinery ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        part, parts = current_part(self.rank, self.world_size)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, part))
        order_gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)) if self.shuffle else None
        for rec in self.records(part, parts, order_gen):
            try:
                target = self.decode_target(rec.target)
                data = rec.image() if callable(rec.image) else rec.image
                image_3HW = self.transform.from_bytes(data, gen)
            except SkipError as e:
                self.skips.skip(e.reason)
                continue
            self.skips.ok()
            yield image_3HW, target

    def check_pass(self) -> dict[str, int]:
        """After a full pass: one summary warning of skips; an error if nothing at all was usable."""
        skips = self.skips.totals()
        if self.skips.yielded == 0:
            detail = f" ({', '.join(f'{n} {r}' for r, n in skips.items())})" if skips else " (it is empty)"
            raise NoValidSamplesError(f"{self.name}: no valid samples{detail}; check it and the files it lists")
        warn_skips(self.name, skips, kept=self.skips.yielded)
        return skips

    def caption_texts(self) -> Iterator[str]:
        """Every cleaned caption in file order without reading images (for tokenizer training), skips counted
        in `self.skips` as in a pass: a caption the training stream would drop never shapes the tokenizer."""
        self.skips.reset()
        for rec in self.records(0, 1, None):
            try:
                target = self.decode_target(rec.target)
            except SkipError as e:
                self.skips.skip(e.reason)
                continue
            self.skips.ok()
            yield target

    def collect(self, convert: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[tuple[torch.Tensor, Any]]:
        """Whole pass in this process as a list (small eval sets, tests, in-memory data); warns/raises like a
        loader. `convert` maps each image as it is decoded (e.g. to uint8: the float images are never all held)."""
        self.skips.reset()
        items = [(convert(image), target) for image, target in self] if convert else list(self)
        self.check_pass()
        return items


MAX_FILE_BYTES = 256 << 20  # larger than any image worth training on; /dev/zero or a stray video is not read


def read_file(path: str) -> Callable[[], bytes]:
    """A deferred read of `path` (runs in the worker). Whatever the path names, the result is its bytes or a
    counted skip: missing, a folder, a FIFO (opened without waiting for a writer, which would hang the run), a
    device, a symlink loop, no permission, or a file too large to be an image."""

    def read() -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise SkipError("missing_file", path) from None
        except OSError as e:  # ELOOP, EACCES, ...
            raise SkipError("not_a_file", f"{path}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise SkipError("missing_file", f"{path} is a folder")
            if not stat.S_ISREG(info.st_mode):
                raise SkipError("not_a_file", path)
            if info.st_size > MAX_FILE_BYTES:
                raise SkipError("oversized_file", f"{path}: {info.st_size} bytes")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as e:  # an I/O error part-way
            raise SkipError("not_a_file", f"{path}: {e.strerror}") from None
        finally:
            os.close(fd)

    return read
