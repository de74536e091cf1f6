"""Held-out evaluation of a model during training and from `limoe eval`: zero-shot classification of held-out
concepts and of seen concepts in unseen renderings, retrieval, and the contrastive loss on fixed held-out batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from limoe import evaluate
from limoe.data import LoaderConfig, Tokenizer, make_loader


@dataclass
class EvalSets:
    """What a run is evaluated on; each part is None when not configured. A zero-shot set is (dataset of (image,
    class index), class names, templates)."""

    zero_shot: tuple | None = None  # held-out concepts (or eval.zero_shot_dir)
    seen: tuple | None = None       # seen concepts in unseen renderings (the corpus)
    retrieval: Any = None           # (image, caption) pairs of held-out concepts (or eval.retrieval_csv)


def tokenize_fn(tokenizer: Tokenizer):
    return lambda texts: tokenizer(list(texts)).ids_BT


def zero_shot(model: nn.Module, tokenizer: Tokenizer, dataset, class_names: Sequence[str],
              templates: Sequence[str], batch_size: int = 256, prefix: str = "zero_shot") -> dict[str, float]:
    """<prefix>/top1, /top5; a dataset with `parts()` (the corpus's: one per style) also gets each part's
    <prefix>/top1/<part>, scored against the same classes (the pooled numbers are exactly the parts' sum)."""
    parts = dataset.parts() if hasattr(dataset, "parts") else {"": dataset}
    class_YD = evaluate.class_embeddings(model, list(class_names), tokenize_fn(tokenizer), list(templates))
    topk = (1, 5)
    out, total_hits, total = {}, dict.fromkeys(topk, 0), 0
    for name, part in parts.items():
        loader = make_loader(part, LoaderConfig(batch_size=batch_size, num_workers=0))
        hits, count = evaluate.zero_shot_hits(evaluate.image_embeddings(model, loader), class_YD, topk)
        total += count
        for k in topk:
            total_hits[k] += hits[k]
        if name and count:
            out[f"{prefix}/top1/{name}"] = hits[1] / count
    return {**{f"{prefix}/top{k}": total_hits[k] / max(total, 1) for k in topk}, **out}


def logit_scale(model: nn.Module) -> float:
    scale = model.logit_scale.detach()
    return float(getattr(scale, "full_tensor", lambda: scale)().exp())  # a DTensor under some layouts


def retrieval(model: nn.Module, tokenizer: Tokenizer, dataset, batch_size: int = 256,
              loss_batch: int = 128) -> dict[str, float]:
    """Recall@k both ways, and (one caption per image) the contrastive loss on fixed batches of loss_batch pairs
    (evaluate.contrastive_loss_from_embeddings, with the model's logit scale)."""
    loader = make_loader(dataset, LoaderConfig(batch_size=batch_size, num_workers=0))
    image_ID, text_JD, owner_J = evaluate.pair_embeddings(model, loader, tokenize_fn(tokenizer))
    out = {f"retrieval/{k}": v for k, v in evaluate.retrieval_from_embeddings(image_ID, text_JD, owner_J).items()}
    if image_ID.shape == text_JD.shape:
        out["retrieval/contrastive_loss"] = evaluate.contrastive_loss_from_embeddings(
            image_ID, text_JD, logit_scale(model), loss_batch)
    return out


def sized(dataset, what: str) -> str:
    """"1,234 images" (or just "images" for a stream of unknown length)."""
    return f"{len(dataset):,} {what}" if hasattr(dataset, "__len__") else what


def held_out(model: nn.Module, tokenizer: Tokenizer, sets: EvalSets, batch_size: int = 256,
             loss_batch: int = 128, progress: Callable[[str], None] | None = None
             ) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, chance levels) on the evaluation sets that are configured; `progress` gets a line as each set's
    (long) pass starts."""
    metrics, chance = {}, {}
    zero_shot_sets = [(prefix, label, part) for prefix, label, part in (
        ("seen", "seen concepts in unseen renderings", sets.seen), ("zero_shot", "zero-shot", sets.zero_shot))
        if part is not None]
    count = len(zero_shot_sets) + (sets.retrieval is not None)
    for i, (prefix, label, (dataset, names, templates)) in enumerate(zero_shot_sets, 1):
        if progress:
            progress(f"[{i}/{count}] {label}: {sized(dataset, 'images')} of {len(names):,} classes")
        metrics.update(zero_shot(model, tokenizer, dataset, names, templates, batch_size, prefix))
        chance[f"{prefix}/top1"] = 1 / len(names)
        chance[f"{prefix}/top5"] = min(1.0, 5 / len(names))
    if sets.retrieval is not None:
        if progress:
            progress(f"[{count}/{count}] retrieval: {sized(sets.retrieval, 'pairs')}")
        metrics.update(retrieval(model, tokenizer, sets.retrieval, batch_size, loss_batch))
        n = len(sets.retrieval) if hasattr(sets.retrieval, "__len__") else 0
        if n:
            chance["retrieval/image_to_text/R@1"] = chance["retrieval/text_to_image/R@1"] = 1 / n
    return metrics, chance
