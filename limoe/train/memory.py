"""Small datasets held in memory: decode once, then batches and light augmentation as tensor ops.

Decoding and resizing a PNG costs about as much as a whole training step of a tiny model on CPU, so for
the built-in dataset (3,278 pairs, ~40 MB at 32 px) the images are decoded once (deterministic centre
crop) and every epoch only permutes indices. The global batch b of epoch e is the slice b of a permutation
seeded by (seed, e), split over ranks, so the batch a rank trains on is a pure function of
(seed, epoch, batch, rank): resuming is exact and 2 ranks see the same global batch as 1 process.
Augmentation (random zoom-in crop, drawn from a generator seeded by (seed, epoch, batch)) is one
affine resampling of the whole batch.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from limoe.data import PairBatch, Tokenizer
from limoe.data.stream import mix_seed


class MemoryBatches:
    """Endless PairBatches from decoded images; `position` (epoch, batch) says where the stream is."""

    def __init__(self, dataset, tokenizer: Tokenizer, global_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, augment: bool = True, crop_scale: tuple[float, float] = (0.8, 1.0),
                 position=None):
        from limoe.train.data import DataPosition

        samples = dataset.collect()  # one decoding pass, skips counted and warned about like a loader
        self.images_N3HW = torch.stack([image for image, _ in samples])
        self.captions = [caption for _, caption in samples]
        tokens = tokenizer(self.captions)
        self.ids_NL, self.padding_NL, self.eos_N = tokens.ids_BL, tokens.padding_mask_BL, tokens.eos_index_B
        if len(samples) < global_batch:
            raise ValueError(f"training data has {len(samples)} samples, fewer than one batch of {global_batch}")
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.seed, self.rank = seed, rank
        self.augment, self.crop_scale = augment, crop_scale
        self.batches_per_epoch = len(samples) // global_batch  # the remainder changes every epoch
        self.position = position or DataPosition()
        self._order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its permutation)

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, epoch: int, index: int) -> PairBatch:
        if self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self), generator=torch.Generator().manual_seed(
                mix_seed(self.seed, epoch))))
        order = self._order[1]
        start = index * self.global_batch + self.rank * self.local_batch
        idx = order[start:start + self.local_batch]
        images = self.images_N3HW[idx]
        if self.augment:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, self.rank, 11))
            images = self.random_crop(images, gen)
        return PairBatch(images, self.ids_NL[idx], self.padding_NL[idx], self.eos_N[idx],
                         [self.captions[i] for i in idx.tolist()])

    def random_crop(self, images_B3HW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Zoom into a random square of area fraction in crop_scale, resampled back to full size."""
        b = images_B3HW.shape[0]
        lo, hi = self.crop_scale
        side_B = (lo + (hi - lo) * torch.rand(b, generator=gen)).sqrt()
        shift_B2 = (2 * torch.rand(b, 2, generator=gen) - 1) * (1 - side_B)[:, None]  # stays inside the image
        theta_B23 = torch.zeros(b, 2, 3)
        theta_B23[:, 0, 0] = theta_B23[:, 1, 1] = side_B
        theta_B23[:, :, 2] = shift_B2
        grid = F.affine_grid(theta_B23, list(images_B3HW.shape), align_corners=False)
        return F.grid_sample(images_B3HW, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __iter__(self) -> Iterator[PairBatch]:
        pos = self.position
        while True:
            while pos.batch < self.batches_per_epoch:
                pos.batch += 1
                yield self.batch(pos.epoch, pos.batch - 1)
            pos.epoch, pos.batch = pos.epoch + 1, 0
