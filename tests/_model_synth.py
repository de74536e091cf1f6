"""Synthetic image-text pairs for model tests: coloured shapes captioned "red circle", and a word tokenizer.

The real datasets are built elsewhere; these are enough to check that the model can learn to pair
images with captions.
"""

from __future__ import annotations

import numpy as np
import torch

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ["<pad>", "<eos>", "a", "photo", "of", *COLOURS, *SHAPES]


def tokenize(texts: list[str], length: int = 16) -> torch.Tensor:
    """Word-level ids, right-padded with 0 and ended by <eos> (id 1)."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [WORDS.index(w) for w in text.replace(".", "").split()][: length - 1] + [1]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def draw(colour: str, shape: str, size: int = 32, rng: np.random.Generator | None = None) -> torch.Tensor:
    """[3, size, size] image of one shape on a grey background, with a little jitter in place and scale."""
    rng = rng or np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = 0.5 + rng.uniform(-0.1, 0.1, 2)
    r = 0.3 + rng.uniform(-0.05, 0.05)
    dy, dx = yy - cy, xx - cx
    mask = {
        "circle": dy**2 + dx**2 < r**2,
        "square": (abs(dy) < r * 0.8) & (abs(dx) < r * 0.8),
        "triangle": (dy < r * 0.8) & (dy > -r) & (abs(dx) < (dy + r) * 0.6),
        "cross": ((abs(dy) < r * 0.25) | (abs(dx) < r * 0.25)) & (abs(dy) < r) & (abs(dx) < r),
    }[shape]
    image = np.full((3, size, size), 0.5, dtype=np.float32)
    image[:, mask] = np.array(COLOURS[colour], dtype=np.float32)[:, None]
    return torch.from_numpy((image - 0.5) / 0.25)


def pairs(n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(images [n, 3, 32, 32], captions, class ids) cycling through every colour x shape."""
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    n = n or len(combos)
    chosen = [combos[i % len(combos)] for i in range(n)]
    images = torch.stack([draw(c, s, rng=rng) for c, s in chosen])
    labels = torch.tensor([i % len(combos) for i in range(n)])
    return images, [f"{c} {s}" for c, s in chosen], labels


def random_batch(config, batch: int, seed: int = 0, min_length: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images [B, 3, H, W] and token ids [B, T] of a model config, each text min_length..T tokens long and
    padded with config.pad_id after them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=g)
    tokens = torch.randint(2, config.vocab_size, (batch, config.context_length), generator=g)
    lengths = torch.randint(min_length, config.context_length + 1, (batch,), generator=g)
    tokens[torch.arange(config.context_length) >= lengths[:, None]] = config.pad_id
    return images, tokens


def filled_groups(x_BNd: torch.Tensor, valid_BN: torch.Tensor | None, group_size: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The routing groups a MoE layer forms from [B, N, d] (padding examples filling the last group), flat:
    (x_Sd, valid_S, num_groups), for the loop references."""
    examples, tokens, dim = x_BNd.shape
    group = group_size or examples
    fill = -examples % group
    x_Sd = torch.cat([x_BNd, x_BNd.new_zeros(fill, tokens, dim)]).reshape(-1, dim)
    real = torch.ones(examples, tokens, dtype=torch.bool) if valid_BN is None else valid_BN
    valid_S = torch.cat([real, real.new_zeros(fill, tokens)]).reshape(-1)
    return x_Sd, valid_S, (examples + fill) // group
