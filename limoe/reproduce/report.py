"""The reproduction's outputs: a markdown table (mean +- std over seeds), results.json and the blog-style plots."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from limoe.analysis.style import IMAGE_COLOUR, TEXT_COLOUR
from limoe.extras import require
from limoe.reproduce.metrics import PROBE_SHOTS
from limoe.reproduce.plan import ABLATIONS, FULL, VARIANTS


def pyplot():
    """pyplot on the Agg backend (no display needed); imported when a plot is drawn, so the tables and the
    command line work without the [analysis] extra."""
    matplotlib = require("matplotlib", "analysis", "the reproduction's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

PROBE = f"linear_probe/{PROBE_SHOTS}shot_balanced"  # see metrics.probe_metrics
SEEN, ZERO_SHOT, PROBE_TITLE = "seen top-1 %", "held-out top-1 %", f"{PROBE_SHOTS}-shot probe %"
# (column title, where the number lives in a result, scale, decimals)
COLUMNS = (
    (SEEN, ("metrics", "seen/top1"), 100, 2),
    (ZERO_SHOT, ("metrics", "zero_shot/top1"), 100, 2),
    ("held-out top-5 %", ("metrics", "zero_shot/top5"), 100, 2),
    ("held-out loss", ("metrics", "retrieval/contrastive_loss"), 1, 3),
    ("R@1 img->txt %", ("metrics", "retrieval/image_to_text/R@1"), 100, 2),
    ("R@1 txt->img %", ("metrics", "retrieval/text_to_image/R@1"), 100, 2),
    (PROBE_TITLE, ("metrics", PROBE), 100, 1),
)
# The routing table of the LIMoE variants; "effective experts" = exp(entropy of a modality's top-1 choices).
ROUTING_COLUMNS = (
    ("routing ok image % (train)", ("train_routing_success", "image"), 100, 1),
    ("routing ok text % (train)", ("train_routing_success", "text"), 100, 1),
    ("routing ok image % (held out)", ("eval_routing_success", "image"), 100, 1),
    ("routing ok text % (held out)", ("eval_routing_success", "text"), 100, 1),
    ("effective experts image", ("effective_experts", "image"), 1, 2),
    ("effective experts text", ("effective_experts", "text"), 1, 2),
    ("image experts / layer", ("specialists", "image"), 1, 1),
    ("text experts / layer", ("specialists", "text"), 1, 1),
)
SPECIALIST_SHARE = 0.9  # an expert whose processed tokens are >= 90% one modality is that modality's expert


def routing_view(result: dict[str, Any]) -> dict[str, Any]:
    """The routing numbers of one LIMoE result, flattened for ROUTING_COLUMNS."""
    ev = result.get("eval_routing") or {}
    layers = ev.get("layers", [])
    specialists = {"image": 0.0, "text": 0.0}
    for layer in layers:
        for share, tokens in zip(layer["image_share"], layer["tokens"]):
            if tokens and share is not None:
                specialists["image"] += (share >= SPECIALIST_SHARE) / len(layers)
                specialists["text"] += (1 - share >= SPECIALIST_SHARE) / len(layers)
    return {"train_routing_success": result.get("train_routing_success", {}),
            "eval_routing_success": ev.get("routing_success", {}),
            "effective_experts": ev.get("effective_experts", {}), "specialists": specialists if layers else {}}


def value_at(result: dict[str, Any], where: tuple[str, ...]) -> float:
    """The number at the path `where` of nested dicts (("metrics", "seen/top1")), NaN where there is none."""
    value: Any = result
    for key in where:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else math.nan


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group(results: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Finished results by (variant, size), in the plan's variant order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    order = {v.name: i for i, v in enumerate((*VARIANTS, *ABLATIONS))}
    for r in sorted((r for r in results if "error" not in r), key=lambda r: (order[r["variant"]], r["size"])):
        groups[(r["variant"], r["size"])].append(r)
    return dict(groups)


def _format(stat: tuple[float, float], scale: float, decimals: int, runs: int) -> str:
    """A summary cell: mean (± std when there is more than one run), or "-" when nothing was measured."""
    mean, std = stat
    if math.isnan(mean):
        return "-"
    return f"{scale * mean:.{decimals}f}" + (f" ± {scale * std:.{decimals}f}" if runs > 1 else "")


def _params(row: dict[str, Any]) -> str:
    return f"{row['total_params'] / 1e6:.2f}M / {row['active_params'] / 1e6:.2f}M"


def summary_rows(results: list[dict[str, Any]], size: str = "base") -> list[dict[str, Any]]:
    """One row per variant at `size`: means and stds of every column, cost, and the seeds used."""
    rows = []
    for (variant, sz), runs in group(results).items():
        if sz != size:
            continue
        row = {"variant": variant, "label": runs[0]["label"], "size": size, "seeds": [r["seed"] for r in runs],
               "routed": bool(runs[0].get("eval_routing")), "total_params": runs[0]["total_params"],
               "active_params": runs[0]["active_params"], "train_flops": runs[0]["train_flops"],
               "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
               # Results of before run_seconds was recorded count their training time only.
               "run_seconds": statistics.fmean(r.get("run_seconds", r["train_seconds"]) for r in runs)}
        for title, where, _, _ in COLUMNS:
            row[title] = mean_std([value_at(r, where) for r in runs])
        for title, where, _, _ in ROUTING_COLUMNS:
            row[title] = mean_std([value_at(routing_view(r), where) for r in runs])
        rows.append(row)
    return rows


def routing_table(results: list[dict[str, Any]]) -> str:
    header = ["variant", *(c[0] for c in ROUTING_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary_rows(results):
        if row["routed"]:
            cells = [_format(row[title], scale, dec, len(row["seeds"])) for title, _, scale, dec in ROUTING_COLUMNS]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: list[dict[str, Any]], size: str = "base") -> str:
    header = ["variant", *(c[0] for c in COLUMNS), "params total / active", "train GFLOPs",
              "min / run (training / in all)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary_rows(results, size):
        cells = [_format(row[title], scale, dec, len(row["seeds"])) for title, _, scale, dec in COLUMNS]
        minutes = f"{row['train_seconds'] / 60:.1f} / {row['run_seconds'] / 60:.1f}"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {_params(row)}"
                     f" | {row['train_flops'] / 1e9:,.0f} | {minutes} |")
    return "\n".join(lines)


PAIRED_COLUMNS = COLUMNS[:4]  # seen, held-out top-1 and top-5, held-out loss


def paired_table(results: list[dict[str, Any]], size: str = "base") -> str | None:
    """(f) minus every other variant at `size`, seed by seed (mean ± std over the seeds both ran); bold: a
    difference beyond twice its spread. None without (f) or another variant sharing a seed."""
    groups = {variant: runs for (variant, sz), runs in group(results).items() if sz == size}
    full = {r["seed"]: r for r in groups.get(FULL, [])}
    lines = []
    for variant, runs in groups.items():
        other = {r["seed"]: r for r in runs}
        seeds = sorted(full.keys() & other.keys())
        if variant == FULL or not seeds:
            continue
        cells = []
        for _, where, scale, decimals in PAIRED_COLUMNS:
            mean, std = mean_std([value_at(full[s], where) - value_at(other[s], where) for s in seeds])
            cell = _format((mean, std), scale, decimals, len(seeds))
            cells.append(f"**{cell}**" if len(seeds) > 1 and abs(mean) > 2 * std else cell)
        lines.append(f"| {runs[0]['label']} | " + " | ".join(cells) + f" | {len(seeds)} |")
    if not lines:
        return None
    header = ["(f) minus", *(c[0] for c in PAIRED_COLUMNS), "seeds"]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


# + style: a corpus run's top-1 on one style's images
STYLE_KEYS = (("seen", "seen/top1/"), ("held-out", "zero_shot/top1/"))


def style_table(results: list[dict[str, Any]]) -> str | None:
    """Top-1 % on each style's images, seen concepts in unseen renderings and held-out concepts (each scored
    against all of its test's classes), per variant at the base size, mean ± std over seeds; None when no run
    reports styles (not trained on the corpus)."""
    styles = sorted({k.removeprefix(key) for r in results if "error" not in r for k in r["metrics"]
                     for _, key in STYLE_KEYS if k.startswith(key)})
    if not styles:
        return None
    lines = ["| variant | test | " + " | ".join(styles) + " |", "|" + "---|" * (len(styles) + 2)]
    for (_, size), runs in group(results).items():
        if size != "base":
            continue
        for test, key in STYLE_KEYS:
            cells = [_format(mean_std([value_at(r, ("metrics", key + s)) for r in runs]), 100, 2, len(runs))
                     for s in styles]
            if any(c != "-" for c in cells):
                lines.append(f"| {runs[0]['label']} | {test} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sweep_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows of the sweep's variants at every size, by variant, then by training compute."""
    variants, sizes = _sweep_variants(results), {r["size"] for r in results if "error" not in r}
    rows = [row for size in sizes for row in summary_rows(results, size) if row["variant"] in variants]
    return sorted(rows, key=lambda row: (row["variant"], row["train_flops"]))


def sweep_table(results: list[dict[str, Any]]) -> str:
    lines = [f"| model | size | params total / active | train GFLOPs | {SEEN} | {ZERO_SHOT} | {PROBE_TITLE} | "
             f"seeds |", "|---|---|---|---|---|---|---|---|"]
    for row in _sweep_rows(results):
        runs = len(row["seeds"])
        lines.append(f"| {row['label']} | {row['size']} | {_params(row)} | {row['train_flops'] / 1e9:,.0f}"
                     f" | {_format(row[SEEN], 100, 2, runs)} | {_format(row[ZERO_SHOT], 100, 2, runs)}"
                     f" | {_format(row[PROBE_TITLE], 100, 1, runs)} | {runs} |")
    return "\n".join(lines)


def _sweep_variants(results: list[dict[str, Any]]) -> set[str]:
    return {r["variant"] for r in results if "error" not in r and r["size"] != "base"}


# -- plots ----------------------------------------------------------------------------------------------------
def plot_accuracy_vs_compute(results: list[dict[str, Any]], path: Path) -> Path | None:
    """The blog's headline picture: accuracy against training compute, LIMoE vs dense, one point per size."""
    rows = _sweep_rows(results)
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (column, title) in zip(axes, ((SEEN, "top-1, seen concepts in unseen renderings"),
                                          (ZERO_SHOT, "top-1, held-out concepts"),
                                          (PROBE_TITLE, f"{PROBE_SHOTS}-shot linear probe"))):
        for variant in sorted({row["variant"] for row in rows}):
            points = [row for row in rows if row["variant"] == variant]  # by training FLOPs
            colour = "#2ca02c" if variant.startswith("limoe") else "#7f7f7f"
            if all(math.isnan(row[column][0]) for row in points):
                continue
            ax.errorbar([row["train_flops"] for row in points], [100 * row[column][0] for row in points],
                        yerr=[100 * row[column][1] for row in points], marker="o", capsize=3, color=colour,
                        label=points[0]["label"])
        flops_axis(ax, title)
        ax.set_ylabel("%")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def flops_axis(ax, title: str) -> None:
    """A panel of quality against training FLOPs: log x axis, its label, the title, a light grid."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(pyplot().NullFormatter())  # a decade or two: minor labels would collide
    ax.set_xlabel("training FLOPs (active, forward + backward)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_routing_success(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Routing success of image and text tokens during training, per LIMoE variant (mean +- std over seeds)."""
    rows = [row for row in summary_rows(results) if row["routed"]]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 1), 3.4))
    x = np.arange(len(rows))
    width = 0.38
    for j, (modality, colour) in enumerate((("image", IMAGE_COLOUR), ("text", TEXT_COLOUR))):
        stats = [row[f"routing ok {modality} % (train)"] for row in rows]
        bars = ax.bar(x + (j - 0.5) * width, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3,
                      color=colour, label=modality)
        for bar, (mean, _) in zip(bars, stats):
            ax.text(bar.get_x() + bar.get_width() / 2, 0.02, f"{mean:.2f}", ha="center", va="bottom", fontsize=7,
                    color="white", rotation=90)
    ax.set_xticks(x, [textwrap.fill(row["label"], 22) for row in rows], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("routing success (top-1 kept)")
    ax.set_title("Routing success per modality during training", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return path
