"""The open_clip-shaped entry points: a model with its image transforms, and a checkpoint's tokenizer.

    model, preprocess_train, preprocess = limoe.create_model_and_transforms(pretrained="runs/my-run")
    tokenizer = limoe.get_tokenizer("runs/my-run")
    z_image = model.encode_image(preprocess(pil_image)[None], normalize=True)
    z_text = model.encode_text(tokenizer(["a red heart", "a cat"]), normalize=True)

Tokenizers are trained with each run on its own captions, so a tokenizer comes from a checkpoint (or run
folder), never from a preset name.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from limoe.data.tokenizer import Tokenizer
from limoe.data.transforms import ImageConfig, ImageTransform
from limoe.model.base import ContrastiveModel
from limoe.model.registry import create_model, list_models


class ImagePreprocess:
    """PIL image (any mode) -> normalised tensor [3, S, S] at the model's image size.

    The training one crops at random and jitters colours, drawing a fresh seed from torch's global generator on
    each call (so torch.manual_seed makes it repeatable); the evaluation one centre-crops, deterministically.
    """

    def __init__(self, image_size: int, train: bool):
        self.transform = ImageTransform(ImageConfig(image_size=image_size), train=train)
        self.train = train

    def __call__(self, image) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, ()))) if self.train else None
        return self.transform(image, gen)

    def __repr__(self) -> str:
        return f"ImagePreprocess(image_size={self.transform.cfg.image_size}, train={self.train})"


class TextTokenizer:
    """A checkpoint's tokenizer as open_clip's: texts -> token ids LongTensor [B, context_length], padded with
    the pad id that `encode_text` masks out by default."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts)).ids_BL

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def create_model_and_transforms(name: str | None = None, pretrained: str | os.PathLike | None = None,
                                device: torch.device | str | None = None, precision: str = "fp32",
                                **overrides: Any) -> tuple[ContrastiveModel, ImagePreprocess, ImagePreprocess]:
    """(model, training image transform, evaluation image transform), as open_clip's function of this name.

    `name`: a preset (`limoe.list_models()`); `pretrained`: a checkpoint, a file in one, or a run folder (then
    `name` is optional); `precision`: as `create_model`.
    """
    model = create_model(name, pretrained=pretrained, device=device, precision=precision, **overrides)
    size = model.config.image_size
    return model, ImagePreprocess(size, train=True), ImagePreprocess(size, train=False)


def get_tokenizer(checkpoint: str | os.PathLike) -> TextTokenizer:
    """The tokenizer a checkpoint (a file in one, e.g. its tokenizer.json, or a run folder's latest checkpoint) was
    trained with."""
    from limoe import checkpoint as ckpt

    if str(checkpoint) in list_models() and not os.path.exists(checkpoint):
        raise ValueError(f"{checkpoint} is a preset: its tokenizer is trained with each run on the run's captions, "
                         f"so pass a checkpoint or run folder")
    return TextTokenizer(ckpt.read_tokenizer(ckpt.resolve(checkpoint)))
