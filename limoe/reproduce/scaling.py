"""The scaling study, `limoe reproduce --study scaling`: dense one-tower against the full LIMoE recipe at several
model sizes and training lengths, plotted against training FLOPs like the paper's quality-vs-compute figure, with
LIMoE's paired advantage at every budget.

Pairing: a seed fixes the data order (the data streams are seeded apart from the model) and, with
`model.paired_init`, every weight the two models share, so the two runs of a seed differ by the MoE layers alone
and their difference is measured with less noise than two unpaired means would give.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limoe.reproduce.plan import VARIANTS, Job, Scale, Size
from limoe.reproduce.report import flops_axis, mean_std, pyplot, save_figure, value_at

DENSE, LIMOE = "dense", "limoe-entropy-bpr"
_PAIRED_INIT = "model.paired_init=true"


@dataclass(frozen=True)
class ScalingStudy:
    sizes: tuple[Size, ...]  # model.* overrides on the scale's base, smallest first
    steps: tuple[int, ...]  # training lengths (the cosine schedule ends at each)
    seeds: tuple[int, ...]
    # LIMoE also with this many experts at `experts_size` and the longest length: more parameters, same compute
    more_experts: int | None = None
    experts_size: str = ""
    parallel: int = 1


W32 = Size("w32", ("model.width=32", "model.heads=2", "model.mlp_dim=128"))
W128 = Size("w128", ("model.width=128", "model.mlp_dim=512"))
STUDIES = {
    "smoke": ScalingStudy((Size("w64"), Size("w48", ("model.width=48", "model.mlp_dim=192"))), (2, 4), (0,),
                          more_experts=4, experts_size="w64"),
    # 39 runs, about 2 hours on 2 cores: w128 costs ~2.5 w64 runs, w32 ~half of one. Half the default length
    # and the default's 2,300 steps (7 passes over the corpus).
    "cpu": ScalingStudy((W32, Size("w64"), W128), (1150, 2300), (0, 1, 2), more_experts=16, experts_size="w64",
                        parallel=2),
    # Prepared for a GPU (not yet run): the gpu scale's base is width 256; 3 sizes x 2 lengths x 3 seeds.
    "gpu": ScalingStudy((Size("w128", ("model.width=128", "model.heads=4", "model.mlp_dim=512")), Size("w256"),
                         Size("w384", ("model.width=384", "model.heads=8", "model.mlp_dim=1536"))),
                        (150, 300), (0, 1, 2), more_experts=32, experts_size="w256"),
}


def budget_job(scale: Scale, overrides: tuple[str, ...], variant: str, size: Size, steps: int, seed: int,
               extra: tuple[str, ...] = ()) -> Job:
    """One run of the study: `variant` (dense, or LIMoE with paired init) at a size and length, budget
    "<size>-<steps>"."""
    v = next(v for v in VARIANTS if v.name == variant)
    paired = (_PAIRED_INIT,) if v.is_limoe else ()
    return Job(v, f"{size.name}-{steps}", seed, (*scale.base, *overrides, *size.overrides, f"steps={steps}", *extra,
                                                 *v.overrides, *paired, f"seed={seed}"),
               f"{v.model}-{scale.model_size}", scale.preset)


def plan_scaling(scale: Scale, seeds: tuple[int, ...] | None = None, overrides: tuple[str, ...] = ()) -> list[Job]:
    """Every size x length x seed for dense and full LIMoE, and LIMoE with more experts at one size. Cheapest
    size first, the more-experts runs right after their size; within a size seed by seed, each dense run beside
    its LIMoE pair: a study stopped part-way leaves complete sizes and complete pairs."""
    study = STUDIES[scale.name]
    seeds = seeds or study.seeds

    def job(variant: str, budget: str, size: Size, steps: int, seed: int, extra: tuple[str, ...] = ()) -> Job:
        return dataclasses.replace(budget_job(scale, overrides, variant, size, steps, seed, extra), size=budget)

    jobs = []
    for size in study.sizes:
        jobs += [job(variant, f"{size.name}-{steps}", size, steps, seed)
                 for seed in seeds for steps in study.steps for variant in (DENSE, LIMOE)]
        if study.more_experts and size.name == study.experts_size:
            steps = max(study.steps)
            jobs += [job(LIMOE, f"{size.name}e{study.more_experts}-{steps}", size, steps, seed,
                         (f"moe.num_experts={study.more_experts}",)) for seed in seeds]
    return jobs


# -- what the study reports --------------------------------------------------------------------------------------
# (column, where in a result, scale, decimals); lower is better for the losses
METRICS = (
    ("seen top-1 %", ("metrics", "seen/top1"), 100, 2),
    ("held-out top-1 %", ("metrics", "zero_shot/top1"), 100, 2),
    ("held-out loss", ("metrics", "retrieval/contrastive_loss"), 1, 3),
    ("train loss (last 100 steps)", ("train_loss",), 1, 3),
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """report.mean_std, but a single value has no spread (NaN): one seed is never judged ahead."""
    mean, std = mean_std(values)
    return mean, std if sum(not math.isnan(v) for v in values) > 1 else math.nan


def _cell(stat: tuple[float, float], scale: float, decimals: int, signed: bool = False) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "-"
    text = f"{scale * mean:{'+' if signed else ''}.{decimals}f}"
    return text if math.isnan(std) else f"{text} ± {scale * std:.{decimals}f}"


def budgets(results: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Finished results by budget ("w64-2300") and variant, budgets in order of training compute."""
    by: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if "error" not in r:
            by[r["size"]][r["variant"]].append(r)
    flops = lambda b: min(r["train_flops"] for runs in by[b].values() for r in runs)
    return {b: dict(by[b]) for b in sorted(by, key=lambda b: (flops(b), b))}


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per budget and model: cost and every metric's mean and std over seeds."""
    out = []
    for budget, variants in budgets(results).items():
        for variant, runs in sorted(variants.items(), key=lambda kv: kv[0] != DENSE):
            first = runs[0]
            row = {"budget": budget, "variant": variant, "seeds": sorted(r["seed"] for r in runs),
                   "steps": first["steps"], "total_params": first["total_params"],
                   "active_params": first["active_params"], "train_flops": first["train_flops"],
                   "experts": _experts(budget, variant),
                   "text_routing": _mean_std([value_at(r, ("train_routing_success", "text")) for r in runs])}
            for title, where, _, _ in METRICS:
                row[title] = _mean_std([value_at(r, where) for r in runs])
            out.append(row)
    return out


def _experts(budget: str, variant: str) -> int | None:
    if variant == DENSE:
        return None
    name = budget.rsplit("-", 1)[0]
    return int(name.split("e")[-1]) if "e" in name else 8


def paired(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LIMoE minus dense per budget, over the seeds both ran (a budget with more experts is paired with dense of
    its size and length)."""
    groups = budgets(results)
    out = []
    for budget, variants in groups.items():
        dense_budget = budget if DENSE in variants else _dense_budget(budget)
        dense = {r["seed"]: r for r in groups.get(dense_budget, {}).get(DENSE, [])}
        limoe = {r["seed"]: r for r in variants.get(LIMOE, [])}
        seeds = sorted(dense.keys() & limoe.keys())
        if not seeds:
            continue
        row = {"budget": budget, "seeds": seeds}
        for title, where, _, _ in METRICS:
            row[title] = _mean_std([value_at(limoe[s], where) - value_at(dense[s], where) for s in seeds])
        out.append(row)
    return out


def _dense_budget(budget: str) -> str:
    name, steps = budget.rsplit("-", 1)
    return f"{name.split('e')[0]}-{steps}"


def verdict(stat: tuple[float, float], lower_is_better: bool = False) -> str:
    """Who is ahead by more than twice the paired differences' spread (std over seeds, as the paper study's bold
    cells); "level" otherwise."""
    mean, std = stat
    if math.isnan(mean) or math.isnan(std):
        return "-"
    if abs(mean) <= 2 * std:
        return "level"
    return "LIMoE" if (mean > 0) != lower_is_better else "dense"


def results_table(results: list[dict[str, Any]]) -> str:
    header = ["budget", "model", "params total / active", "train GFLOPs", *(m[0] for m in METRICS),
              "text routed % (train)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(results):
        model = "dense" if row["variant"] == DENSE else f"LIMoE, {row['experts']} experts"
        cells = [_cell(row[title], scale, dec) for title, _, scale, dec in METRICS]
        routed = _cell(row["text_routing"], 100, 1) if row["variant"] != DENSE else ""
        lines.append(f"| {row['budget']} | {model} | {row['total_params'] / 1e6:.2f}M / "
                     f"{row['active_params'] / 1e6:.2f}M | {row['train_flops'] / 1e9:,.0f} | " + " | ".join(cells)
                     + f" | {routed} | {len(row['seeds'])} |")
    return "\n".join(lines)


def paired_table(results: list[dict[str, Any]]) -> str:
    header = ["budget", *(f"LIMoE - dense, {m[0]}" for m in METRICS), "ahead on seen / held-out top-1", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in paired(results):
        cells = [_cell(row[title], scale, dec, signed=True) for title, _, scale, dec in METRICS]
        ahead = f"{verdict(row[METRICS[0][0]])} / {verdict(row[METRICS[1][0]])}"
        lines.append(f"| {row['budget']} | " + " | ".join(cells) + f" | {ahead} | {len(row['seeds'])} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Each metric against training FLOPs (log axis): one line per model family and training length through the
    sizes, LIMoE with more experts as a star; error bars are the std over seeds."""

    table = rows(results)
    if not table:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    lengths = sorted({row["steps"] for row in table})
    styles = dict(zip(lengths, ("--", "-", ":", "-.")))
    for ax, (title, _, scale, _) in zip(axes, METRICS):
        for variant, colour, name in ((DENSE, "#7f7f7f", "dense"), (LIMOE, "#2ca02c", "LIMoE")):
            for steps in lengths:
                line = [r for r in table if r["variant"] == variant and r["steps"] == steps
                        and r["experts"] in (None, 8)]
                if line:
                    ax.errorbar([r["train_flops"] for r in line], [scale * r[title][0] for r in line],
                                yerr=[0 if math.isnan(r[title][1]) else scale * r[title][1] for r in line],
                                marker="o", capsize=3, color=colour, linestyle=styles[steps],
                                label=f"{name}, {steps:,} steps")
                    if ax is axes[0]:  # which size each point is
                        for r in line:
                            ax.annotate(r["budget"].split("-")[0], (r["train_flops"], scale * r[title][0]),
                                        textcoords="offset points", xytext=(4, -9), fontsize=7, color=colour)
        for r in table:
            if r["experts"] not in (None, 8):
                ax.errorbar([r["train_flops"]], [scale * r[title][0]], yerr=[0 if math.isnan(r[title][1]) else
                            scale * r[title][1]], marker="*", markersize=11, color="#1f77b4", capsize=3,
                            linestyle="", label=f"LIMoE, {r['experts']} experts, {r['steps']:,} steps")
        flops_axis(ax, title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def markdown(results: list[dict[str, Any]], jobs: list[Job], command: str, minutes: float | None,
             plot_path: Path | None) -> str:
    """results.md of the study; `minutes` None: written by --report-only, which trained nothing."""
    train_minutes = sum(r["train_seconds"] for r in results if "error" not in r) / 60
    invocation = "this report trained nothing (--report-only)" if minutes is None else \
        f"this invocation {minutes:.1f} min"
    parts = [
        "# limoe reproduce: the scaling study", "",
        f"`{command}`: dense one-tower and full LIMoE (8 experts, top-1, the default recipe) at each model size "
        f"and training length; LIMoE's shared weights start as dense's of the same seed (`model.paired_init`) "
        f"and both see the same data order. {len(results)} of the plan's {len(jobs)} runs finished; their "
        f"training took {train_minutes:.0f} min in all; {invocation}. Budget: size (width) and training steps. "
        f"Train loss: the contrastive loss of the last 100 training steps (batch 128); held-out loss: on fixed "
        f"batches of 128 held-out-concept pairs. Mean ± std over seeds.", "",
        results_table(results), "",
        "## LIMoE minus dense, paired by seed", "",
        "Positive top-1 and negative losses favour LIMoE. Ahead: by more than twice the std of the paired "
        "differences; level otherwise.", "",
        paired_table(results), ""]
    if plot_path is not None:
        parts += [f"![quality against training compute]({plot_path.name})", ""]
    parts += ["## Commands", "", "Each run is one `limoe train`:", "", "```"]
    parts += [f"{job.command()} --run-dir runs/{job.name}" for job in jobs]
    parts += ["```", ""]
    return "\n".join(parts)
