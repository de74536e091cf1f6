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
    """zero_shot/top1, /top5; a dataset with `parts()` (the corpus's: one per style) also gets each part's
    zero_shot/top1/<part>, scored against the same classes (the pooled numbers are exactly the parts' sum)."""
    parts = dataset.parts() if hasattr(dataset, "parts") else {"": dataset}
    class_CD = evaluate.class_embeddings(model, list(class_names), tokenize_fn(tokenizer), list(templates))
    topk = (1, 5)
    out, total_hits, total = {}, dict.fromkeys(topk, 0), 0
    for name, part in parts.items():
        loader = make_loader(part, LoaderConfig(batch_size=batch_size, num_workers=0))
        hits, count = evaluate.zero_shot_hits(evaluate.image_embeddings(model, loader), class_CD, topk)
        total += count
        for k in topk:
            total_hits[k] += hits[k]
        if name and count:
            out[f"zero_shot/top1/{name}"] = hits[1] / count
    return {**{f"zero_shot/top{k}": total_hits[k] / max(total, 1) for k in topk}, **out}


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
