"""Loaders: a DataLoader over a SampleStream with worker processes, seeded, one skip summary per pass.

The split over ranks and workers is done by the stream itself (stream.py), so a DataLoader with any
number of workers, on any number of ranks, reads every sample exactly once per epoch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from limoe.data.stats import DataError
from limoe.data.stream import SampleStream, mix_seed
from limoe.data.workers import START_METHOD, holding_stop_signals, init_worker


@dataclass
class LoaderConfig:
    batch_size: int = 64
    num_workers: int = 2
    drop_last: bool = False  # True for training (fixed batch shapes); False keeps every eval sample
    prefetch_factor: int = 2
    pin_memory: bool = False


def useful_workers(cfg: LoaderConfig, samples_per_rank: int | None) -> int:
    """num_workers, lowered for a map-like source so no worker is idle or short of a batch.

    Each worker batches its own share, so with drop_last a worker holding less than one batch gives nothing
    (8 workers on 10 samples with batch 4 would give no batch at all), and without it every worker ends on a
    short batch. At most one worker per batch. Unknown lengths (shards) keep the configured number.
    """
    if samples_per_rank is None or cfg.num_workers == 0:
        return cfg.num_workers
    batches = samples_per_rank // cfg.batch_size if cfg.drop_last else -(-samples_per_rank // cfg.batch_size)
    return min(cfg.num_workers, batches)


class StreamLoader:
    """Iterate batches epoch after epoch; each `iter()` is one epoch with a fresh shuffle.

    After every full pass the skips are checked: a source that yielded nothing raises
    NoValidSamplesError; skips are warned about once (again only if the counts change).
    """

    def __init__(self, dataset: SampleStream, cfg: LoaderConfig | None = None,
                 collate_fn: Callable | None = None, epoch: int = 0):
        self.dataset = dataset
        self.cfg = cfg or LoaderConfig()
        self.collate_fn = collate_fn
        self.epoch = epoch
        self.last_skips: dict[str, int] | None = None

    def _samples_per_rank(self) -> int | None:
        ds = self.dataset
        if not hasattr(ds, "__len__"):
            return None
        world = ds.world_size if ds.world_size is not None else (
            torch.distributed.get_world_size() if torch.distributed.is_available()
            and torch.distributed.is_initialized() else 1)
        return len(ds) // world

    def _dataloader(self) -> DataLoader:
        cfg = self.cfg
        workers = useful_workers(cfg, self._samples_per_rank())
        rows = self.dataset.skips.counts_per_worker.shape[0] - 1
        if workers > rows:
            raise DataError(f"num_workers={workers} is more than the {rows} data workers supported; lower it")
        return DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            num_workers=workers,
            collate_fn=self.collate_fn,
            drop_last=cfg.drop_last,
            pin_memory=cfg.pin_memory,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            # Workers are re-created each epoch so they see the new epoch (and its shuffle).
            persistent_workers=False,
            worker_init_fn=functools.partial(init_worker, os.getpid()) if workers > 0 else None,
            multiprocessing_context=START_METHOD if workers > 0 else None,
            generator=torch.Generator().manual_seed(mix_seed(self.dataset.seed, self.epoch, 7)),
        )

    def __iter__(self) -> Iterator:
        self.dataset.set_epoch(self.epoch)
        self.dataset.skips.reset()
        with holding_stop_signals(spawning=START_METHOD != "fork"):  # the workers start here (limoe.data.workers)
            batches = iter(self._dataloader())
        try:
            yield from batches
        except RuntimeError as e:
            cause = str(e.__cause__ or e).strip().rstrip(".")  # torch's cause names the signal that killed it
            if "DataLoader worker" not in cause:
                raise
            raise DataError(f"{cause} (out of memory? lower data.num_workers or data.batch_size)") from None
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:  # now, not when the garbage collector gets to it
                shutdown()
        skips = self.dataset.skips.totals()
        if self.last_skips is None or skips != self.last_skips or self.dataset.skips.yielded == 0:
            self.dataset.check_pass()  # warns (or raises when nothing was usable)
        self.last_skips = skips
        self.epoch += 1


def make_loader(dataset: SampleStream, cfg: LoaderConfig | None = None, tokenizer=None,
                collate_fn: Callable | None = None) -> StreamLoader:
    """Loader for pairs (pass the tokenizer to get PairBatch) or for (image, label) datasets."""
    if collate_fn is None and tokenizer is not None:
        from limoe.data.collate import PairCollate

        collate_fn = PairCollate(tokenizer)
    elif collate_fn is None and dataset.target_kind == "label":
        from limoe.data.collate import collate_labels

        collate_fn = collate_labels
    return StreamLoader(dataset, cfg, collate_fn)
