"""Small datasets held in memory: decode once, then batches and light augmentation as tensor ops.

Decoding and resizing a PNG costs about as much as a whole training step of a tiny model on CPU, so for
the built-in dataset (3,278 pairs, ~40 MB at 32 px) the images are decoded once (deterministic centre
crop) and every epoch only permutes indices. The global batch b of epoch e is the slice b of a permutation
seeded by (seed, e), split over ranks, so the batch a rank trains on is a pure function of
(seed, epoch, batch, rank): resuming is exact and 2 ranks see the same global batch as 1 process.
Images are kept as uint8 at twice the training size, so a zoom-in crop still has detail to show;
augmentation (random crop + colour jitter, drawn from a generator seeded by (seed, epoch, batch)) is one
affine resampling of the whole batch and a few elementwise ops.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from limoe.data import DataError, ImageConfig, PairBatch, Tokenizer
from limoe.data.stream import DataPosition, mix_seed


class MemoryBatches:
    """Endless PairBatches from decoded images; `position` (epoch, batch) says where the stream is."""

    def __init__(self, dataset, tokenizer: Tokenizer, global_batch: int, seed: int, image: ImageConfig,
                 rank: int = 0, world_size: int = 1, augment: bool = True, position=None,
                 caption_of: Callable[[int, int], str] | None = None):
        """`dataset` yields (image in [0, 1] (mean 0, std 1), caption); `image` says the output size,
        normalisation and augmentation strength (crop_scale, jitter). `caption_of(epoch, row)`, if given, draws
        a caption per epoch (the corpus) instead of the one the decoding pass read."""
        # One decoding pass, skips counted and warned about like a loader; each image kept as uint8 as soon as it
        # is decoded (the whole corpus as float would be 4x the memory).
        samples = dataset.collect(lambda image: (image * 255).round().to(torch.uint8))
        if caption_of is not None and len(samples) != len(dataset):
            # Sample j is row j only when no row was skipped.
            raise DataError(f"{dataset.name}: {len(dataset) - len(samples)} unreadable rows; rebuild the data or "
                            f"set data.in_memory=false")
        self.caption_of, self.tokenizer = caption_of, tokenizer
        self._skips = dataset.skips.totals()  # every later epoch reuses the decoded samples: no new skips
        self.images_B3HW = torch.stack([image for image, _ in samples])  # B: every sample of the set
        self.captions = [caption for _, caption in samples]
        tokens = tokenizer(self.captions)
        self.ids_BT, self.padding_BT, self.eos_B = tokens.ids_BT, tokens.padding_mask_BT, tokens.eos_index_B
        if len(samples) < global_batch:
            raise DataError(f"{dataset.name}: {len(samples)} valid samples, fewer than one batch of {global_batch}; "
                            f"lower data.batch_size or add data")
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.seed, self.rank = seed, rank
        self.augment, self.image = augment, image
        self.mean_1311 = torch.tensor(image.mean).view(1, 3, 1, 1)
        self.std_1311 = torch.tensor(image.std).view(1, 3, 1, 1)
        self.batches_per_epoch = len(samples) // global_batch  # the remainder changes every epoch
        self.position = position or DataPosition()
        self._order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its permutation)

    def __len__(self) -> int:
        return len(self.captions)

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped by reason in this run: those of the one decoding pass (epochs reuse its samples)."""
        return dict(sorted(self._skips.items()))

    def batch(self, epoch: int, index: int) -> PairBatch:
        if self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self), generator=torch.Generator().manual_seed(
                mix_seed(self.seed, epoch))))
        order = self._order[1]
        start = index * self.global_batch + self.rank * self.local_batch
        idx = order[start:start + self.local_batch]
        images = self.images_B3HW[idx].float().div_(255.0)
        # Random numbers are drawn for the whole global batch and sliced, so an image gets the same crop
        # whatever the number of ranks: 2 ranks train on exactly the batch 1 process would.
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, 11))
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        u_crop_B3 = torch.rand(self.global_batch, 3, generator=gen)[mine]
        u_jitter_B3 = torch.rand(self.global_batch, 3, generator=gen)[mine]
        images = self.resample(images, u_crop_B3 if self.augment else None)
        if self.augment and self.image.jitter > 0:
            images = self.jitter(images, u_jitter_B3)
        images = (images - self.mean_1311) / self.std_1311
        if self.caption_of is not None:  # a few hundred captions tokenize in well under a millisecond each
            captions = [self.caption_of(epoch, i) for i in idx.tolist()]
            tokens = self.tokenizer(captions)
            return PairBatch(images, tokens.ids_BT, tokens.padding_mask_BT, tokens.eos_index_B, captions)
        return PairBatch(images, self.ids_BT[idx], self.padding_BT[idx], self.eos_B[idx],
                         [self.captions[i] for i in idx.tolist()])

    def resample(self, images_B3HW: torch.Tensor, u_B3: torch.Tensor | None) -> torch.Tensor:
        """To the output size; with uniform numbers `u_B3`, first zoom into a random square of area fraction
        in crop_scale (u[:, 0]) at a random place inside the image (u[:, 1:])."""
        b, size = images_B3HW.shape[0], self.image.image_size
        if u_B3 is None:
            return F.interpolate(images_B3HW, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)
        lo, hi = self.image.crop_scale
        side_B = (lo + (hi - lo) * u_B3[:, 0]).sqrt()
        shift_B2 = (2 * u_B3[:, 1:] - 1) * (1 - side_B)[:, None]  # stays inside the image
        theta_B23 = torch.zeros(b, 2, 3)
        theta_B23[:, 0, 0] = theta_B23[:, 1, 1] = side_B
        theta_B23[:, :, 2] = shift_B2
        grid = F.affine_grid(theta_B23, [b, 3, size, size], align_corners=False)
        return F.grid_sample(images_B3HW, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def jitter(self, x_B3HW: torch.Tensor, u_B3: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation factors in [1 - jitter, 1 + jitter] per image (from u_B3)."""
        f_B3 = 1.0 + self.image.jitter * (2 * u_B3 - 1)
        x_B3HW = x_B3HW * f_B3[:, 0, None, None, None]
        mean_B111 = x_B3HW.mean(dim=(1, 2, 3), keepdim=True)
        x_B3HW = (x_B3HW - mean_B111) * f_B3[:, 1, None, None, None] + mean_B111
        gray_B1HW = (0.299 * x_B3HW[:, 0] + 0.587 * x_B3HW[:, 1] + 0.114 * x_B3HW[:, 2]).unsqueeze(1)
        x_B3HW = (x_B3HW - gray_B1HW) * f_B3[:, 2, None, None, None] + gray_B1HW
        return x_B3HW.clamp_(0.0, 1.0)

    def __iter__(self) -> Iterator[PairBatch]:
        pos = self.position
        while True:
            while pos.batch < self.batches_per_epoch:
                pos.batch += 1
                yield self.batch(pos.epoch, pos.batch - 1)
            pos.epoch, pos.batch = pos.epoch + 1, 0
