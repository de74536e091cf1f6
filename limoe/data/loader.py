"""Loaders: a DataLoader over a SampleStream with worker processes, seeded, one skip summary per pass.

The split over ranks and workers is done by the stream itself (stream.py), so a DataLoader with any
number of workers, on any number of ranks, reads every sample exactly once per epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from limoe.data.stream import SampleStream, mix_seed


@dataclass
class LoaderConfig:
    batch_size: int = 64
    num_workers: int = 2
    drop_last: bool = False  # True for training (fixed batch shapes); False keeps every eval sample
    prefetch_factor: int = 2
    pin_memory: bool = False


def _seed_worker(worker_id: int) -> None:
    """Seed Python/NumPy in each worker from torch's per-worker seed (itself from the loader's generator),
    so any user transform that uses `random` or NumPy is reproducible too."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


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

    def _dataloader(self) -> DataLoader:
        cfg = self.cfg
        workers = cfg.num_workers
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
            worker_init_fn=_seed_worker if workers > 0 else None,
            generator=torch.Generator().manual_seed(mix_seed(self.dataset.seed, self.epoch, 7)),
        )

    def __iter__(self) -> Iterator:
        self.dataset.set_epoch(self.epoch)
        self.dataset.skips.reset()
        yield from self._dataloader()
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
