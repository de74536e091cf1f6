"""Held-out evaluation of a model during training and from `limoe eval`: zero-shot and retrieval."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from limoe import evaluate
from limoe.data import LoaderConfig, Tokenizer, make_loader


def tokenize_fn(tokenizer: Tokenizer):
    return lambda texts: tokenizer(list(texts)).ids_BL


def zero_shot(model: nn.Module, tokenizer: Tokenizer, dataset, class_names: Sequence[str],
              templates: Sequence[str], batch_size: int = 256) -> dict[str, float]:
    loader = make_loader(dataset, LoaderConfig(batch_size=batch_size, num_workers=0))
    result = evaluate.zero_shot_classification(model, loader, list(class_names), tokenize_fn(tokenizer),
                                               list(templates))
    return {f"zero_shot/{k}": v for k, v in result.items()}


def retrieval(model: nn.Module, tokenizer: Tokenizer, dataset, batch_size: int = 256) -> dict[str, float]:
    loader = make_loader(dataset, LoaderConfig(batch_size=batch_size, num_workers=0))
    result = evaluate.retrieval(model, loader, tokenize_fn(tokenizer))
    return {f"retrieval/{k}": v for k, v in result.items()}


def held_out(model: nn.Module, tokenizer: Tokenizer, zero_shot_set, retrieval_set,
             batch_size: int = 256) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, chance levels) on the evaluation sets that are configured (either may be None)."""
    metrics, chance = {}, {}
    if zero_shot_set is not None:
        dataset, names, templates = zero_shot_set
        metrics.update(zero_shot(model, tokenizer, dataset, names, templates, batch_size))
        chance["zero_shot/top1"] = 1 / len(names)
        chance["zero_shot/top5"] = min(1.0, 5 / len(names))
    if retrieval_set is not None:
        metrics.update(retrieval(model, tokenizer, retrieval_set, batch_size))
        n = len(retrieval_set) if hasattr(retrieval_set, "__len__") else 0
        if n:
            chance["retrieval/image_to_text/R@1"] = chance["retrieval/text_to_image/R@1"] = 1 / n
    return metrics, chance
