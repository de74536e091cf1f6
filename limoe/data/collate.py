"""Batching: stack images, tokenize captions to fixed-length ids + padding mask."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from limoe.data.tokenizer import Tokenizer
from limoe.deprecation import renamed_arguments, renamed_attribute


@dataclass
class PairBatch:
    images_B3HW: torch.Tensor      # float [B, 3, H, W], normalised
    ids_BT: torch.Tensor           # int64 [B, T]
    padding_mask_BT: torch.Tensor  # bool  [B, T], True at padding
    eos_index_B: torch.Tensor      # int64 [B], position of the EOS (last real) token
    captions: list[str]            # the raw captions, for logging and retrieval reports

    ids_BL = renamed_attribute("ids_BT")
    padding_mask_BL = renamed_attribute("padding_mask_BT")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return PairBatch(**moved)

    def pin_memory(self) -> "PairBatch":  # called by DataLoader(pin_memory=True)
        return PairBatch(self.images_B3HW.pin_memory(), self.ids_BT.pin_memory(),
                         self.padding_mask_BT.pin_memory(), self.eos_index_B.pin_memory(), self.captions)

    def __len__(self) -> int:
        return self.images_B3HW.shape[0]

    def rows(self, start: int, stop: int) -> "PairBatch":
        """Pairs start..stop-1 of this batch (views, no copies): a micro-batch of gradient accumulation."""
        return PairBatch(self.images_B3HW[start:stop], self.ids_BT[start:stop], self.padding_mask_BT[start:stop],
                         self.eos_index_B[start:stop], self.captions[start:stop])


PairBatch.__init__ = renamed_arguments(ids_BL="ids_BT", padding_mask_BL="padding_mask_BT")(PairBatch.__init__)


class PairCollate:
    """collate_fn for (image, caption) samples; a class (not a closure) so worker processes can pickle it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[tuple[torch.Tensor, str]]) -> PairBatch:
        images, captions = zip(*samples)
        tokens = self.tokenizer(list(captions))
        return PairBatch(torch.stack(images), tokens.ids_BT, tokens.padding_mask_BT, tokens.eos_index_B,
                         list(captions))


def collate_labels(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, class index) samples -> (images [B,3,H,W], labels int64 [B])."""
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
