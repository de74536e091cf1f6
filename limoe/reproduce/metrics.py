"""What a reproduction measures beyond training's own held-out metrics: the few-shot probe and routing."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

import torch

PROBE_SHOTS = 10
PROBE_DRAWS = 5  # shot draws averaged per probe


def probe_metrics(model, cfg, shots: int = PROBE_SHOTS, seed: int = 0) -> dict[str, float]:
    """A `shots`-shot ridge probe on frozen image embeddings: classify built-in emoji into Unicode
    subcategories (animal-mammal, food-fruit, ...), one image per concept. Accuracy over all test images and
    balanced (mean per-class recall: country flags are a quarter of the images). NaN when no class is big enough."""
    from limoe import evaluate
    from limoe.data.categories import builtin_category_probe
    from limoe.jobs import load_images
    from limoe.train.data import builtin_config

    # The whole built-in set even when training used a subset (data.max_concepts): the probe is its own task.
    whole = dataclasses.replace(builtin_config(cfg), max_concepts=None)
    paths, labels, names = builtin_category_probe(whole, min_concepts=shots + 1)
    keys = (f"linear_probe/{shots}shot", f"linear_probe/{shots}shot_balanced")
    if len(names) < 2:  # one class: every guess is right, which measures nothing
        return dict.fromkeys(keys, math.nan)
    size = cfg.eval.batch_size
    batches = ((load_images([str(p) for p in paths[i:i + size]], cfg.data.image_size), labels[i:i + size])
               for i in range(0, len(paths), size))
    embeds_BD = torch.cat([z.float().cpu() for z, _ in evaluate.image_embeddings(model, batches)])
    labels_B = torch.tensor(labels)
    totals = dict.fromkeys(keys, 0.0)
    for draw in range(PROBE_DRAWS):  # which concepts are the shots moves the score by a few points: average
        train_idx, test_idx, new_B = evaluate.k_shot_split(labels_B, shots, seed + draw)
        result = evaluate.linear_probe_from_embeddings(embeds_BD[train_idx], new_B[train_idx],
                                                       [(embeds_BD[test_idx], new_B[test_idx])], len(names))
        totals[keys[0]] += result["accuracy"] / PROBE_DRAWS
        totals[keys[1]] += result["balanced_accuracy"] / PROBE_DRAWS
    return totals


def held_out_routing(model, tokenizer, cfg):
    """Routing analysis of the held-out pairs, encoded as in training (in the model's routing groups) with eval
    routing."""
    from limoe.analysis.routing_stats import AnalysisConfig, analyze_routing
    from limoe.data import ImageConfig
    from limoe.train.data import held_out_pairs

    pairs = held_out_pairs(cfg, ImageConfig(image_size=cfg.data.image_size), train=False, shuffle=True, seed=0,
                           rank=0, world_size=1)
    return analyze_routing(model, tokenizer, pairs, AnalysisConfig(num_pairs=None, batch_size=cfg.data.batch_size))


def routing_summary(analysis) -> dict[str, Any]:
    """Per modality routing success over all MoE layers, and per layer each expert's image share."""
    totals = None
    for layer in analysis.layers:
        totals = layer.stats if totals is None else totals + layer.stats
    mods = list(totals.modalities)
    layers = []
    for layer in analysis.layers:  # an idle expert's share is NaN (null in JSON)
        layers.append({"name": layer.ref.name, "image_share": layer.stats.share_of("image").tolist(),
                       "tokens": layer.stats.processed_ME.sum(0).tolist()})
    return {"routing_success": {m: totals.routing_success_M[i].item() for i, m in enumerate(mods)},
            "effective_experts": {m: statistics.fmean(effective_experts(layer.stats.routed_ME[i])
                                                      for layer in analysis.layers) for i, m in enumerate(mods)},
            "layers": layers}


def effective_experts(routed_E: torch.Tensor) -> float:
    """exp(entropy) of how a modality's routing choices spread over experts: E if even, 1 if all pick one
    expert (a collapse that capacity slack can hide from routing success)."""
    p_E = routed_E.double() / routed_E.sum().clamp(min=1)
    return math.exp(-float(torch.special.xlogy(p_E, p_E).sum()))


def final_train_loss(run_dir: Path, steps: int, last: int = 100) -> float:
    """Mean contrastive loss of the logged training steps among the last `last`: how well the run fits its
    training pairs at the end (NaN when none were logged)."""
    from limoe.analysis.metrics_log import read_metrics

    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    values = [r["contrastive_loss"] for r in rows if r.get("kind") == "train" and r.get("step", 0) > steps - last
              and isinstance(r.get("contrastive_loss"), (int, float))]
    return sum(values) / len(values) if values else math.nan


def train_routing_success(run_dir: Path, steps: int) -> dict[str, float]:
    """Mean routing success per modality over the logged training steps of the second half of the run."""
    from limoe.analysis.metrics_log import read_metrics

    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    out = {}
    for modality in ("image", "text"):
        key = f"routing/routing_success/{modality}"
        values = [r[key] for r in rows if r.get("kind") == "train" and r.get("step", 0) > steps / 2
                  and isinstance(r.get(key), (int, float))]
        if values:
            out[modality] = sum(values) / len(values)
    return out
