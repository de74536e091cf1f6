"""Modality-specific input embeddings: image patches and text tokens, each with learned positions."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """[B, 3, H, W] (3: `in_channels`) -> [B, N, d] (N = P patches): a conv with kernel = stride = patch, plus a
    learned 2-D position grid."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # One vector per (row, column) cell, stored flat in raster order.
        self.pos_1Nd = nn.Parameter(torch.empty(1, self.grid * self.grid, dim))
        nn.init.normal_(self.pos_1Nd, std=0.02)
        # LeCun-normal patch kernel as in ViT; the conv bias starts at zero.
        nn.init.trunc_normal_(self.proj.weight, std=(in_channels * patch_size**2) ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if images_B3HW.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images_B3HW.shape)}")
        grid = self.proj(images_B3HW)  # [B, d, grid rows, grid columns]
        if grid.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"images must be {self.grid * self.proj.stride[0]} pixels square, "
                             f"got {tuple(images_B3HW.shape[-2:])}")
        return grid.flatten(2).transpose(1, 2) + self.pos_1Nd


class TokenEmbed(nn.Module):
    """[B, T] token ids -> [B, T, d]: token table plus learned 1-D positions (T <= context_length)."""

    def __init__(self, vocab_size: int, context_length: int, dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos_1Td = nn.Parameter(torch.empty(1, context_length, dim))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos_1Td, std=0.02)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        if tokens_BT.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens_BT.shape)}")
        length = tokens_BT.shape[1]
        if length > self.pos_1Td.shape[1]:
            raise ValueError(f"text length {length} exceeds context_length {self.pos_1Td.shape[1]}")
        return self.tok(tokens_BT) + self.pos_1Td[:, :length]
