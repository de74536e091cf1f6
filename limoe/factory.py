"""The open_clip-shaped entry points, and the one place that loads a trained model: a preset or a checkpoint's
model (`create_model`), with its image transforms, a checkpoint's tokenizer, or all a checkpoint holds
(`load_checkpoint`: model, tokenizer, config).

    model, preprocess_train, preprocess = limoe.create_model_and_transforms(pretrained="runs/my-run")
    tokenizer = limoe.get_tokenizer("runs/my-run")
    z_image = model.encode_image(preprocess(pil_image)[None], normalize=True)
    z_text = model.encode_text(tokenizer(["a red heart", "a cat"]), normalize=True)

Tokenizers are trained with each run on its own captions, so a tokenizer comes from a checkpoint (or run
folder), never from a preset name.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch

from limoe import checkpoint as ckpt
from limoe.data.tokenizer import Tokenizer
from limoe.data.transforms import ImageConfig, ImageTransform
from limoe.model.base import ContrastiveModel
from limoe.model.registry import build_model, get_config, list_models, with_overrides

# open_clip's `precision` values: the weights' dtype (None: float32; "amp*" leave autocast to the caller).
PRECISIONS = {"fp32": None, "amp": None, "amp_bf16": None, "amp_bfloat16": None, "bf16": torch.bfloat16,
              "pure_bf16": torch.bfloat16, "fp16": torch.float16, "pure_fp16": torch.float16}


def create_model(name: str | None = None, pretrained: str | os.PathLike | None = None,
                 device: torch.device | str | None = None, precision: str = "fp32",
                 **overrides: Any) -> ContrastiveModel:
    """Build a preset, or with `pretrained` (a checkpoint folder, a file in one, or a run folder) the checkpoint's
    model with its weights; `name`, if given too, must be the model it was trained as. `device="meta"` builds the
    module structure without allocating weights. `precision` as open_clip's: "fp32" (also "amp", "amp_bf16":
    float32 weights, autocast is the caller's), "bf16" / "fp16" (every weight cast). The model is in train mode,
    as any new nn.Module: call .eval()."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if pretrained is None:
        if name is None:
            raise ValueError("create_model needs a model name or pretrained=<checkpoint>")
        config, path = get_config(name, **overrides), None
    else:
        if str(device) == "meta":
            raise ValueError("pretrained weights cannot be loaded into a meta-device model")
        path = ckpt.resolve(pretrained)
        trained_as = ckpt.read_json(path / "config.json").get("model")
        if name is not None and name != trained_as:
            raise ValueError(f"{path} holds a {trained_as} model, not {name}")
        config = with_overrides(ckpt.read_model_config(path), **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model(config)
    if path is not None:
        ckpt.load_weights(model, path)
    if PRECISIONS[precision] is not None:
        model.to(PRECISIONS[precision])
    return model


def load_checkpoint(path: str | os.PathLike = "latest", device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, TrainConfig) from a checkpoint folder or a run directory (its latest)."""
    from limoe.train.config import TrainConfig

    path = ckpt.resolve(path)
    try:
        config = TrainConfig.from_dict(ckpt.read_json(path / "config.json"))
    except (ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"{path / 'config.json'}: unreadable config ({e})") from None
    model = create_model(pretrained=path).to(device).eval()
    return model, ckpt.read_tokenizer(path), config


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
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts)).ids_BT

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
    if str(checkpoint) in list_models() and not os.path.exists(checkpoint):
        raise ValueError(f"{checkpoint} is a preset: its tokenizer is trained with each run on the run's captions, "
                         f"so pass a checkpoint or run folder")
    return TextTokenizer(ckpt.read_tokenizer(ckpt.resolve(checkpoint)))
