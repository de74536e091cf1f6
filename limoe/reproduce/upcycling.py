"""The upcycling study, `limoe reproduce --study upcycling`: is a dense run continued as a LIMoE (sparse upcycling,
Komatsuzaki et al. 2022: every expert a copy of its block's trained MLP, routers fresh) better than the same dense
run trained on for as long, at equal training steps?

Per seed, at the scaling study's default size: dense trained N steps; LIMoE upcycled from it, trained N more
(`limoe train --init-from`); dense trained 2N steps; LIMoE trained 2N steps from scratch (paired init). The dense
and from-scratch runs are the scaling study's own (same names and configs), so the study shares its folder and
adds only the upcycled runs. Each run has the default recipe's schedule over its own steps (warmup, cosine): the
upcycled run starts a new one, as continued training usually does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from limoe.reproduce.plan import RUNS, Job, Scale, Size, Variant
from limoe.reproduce.report import value_at
from limoe.reproduce.scaling import DENSE, LIMOE, METRICS, _cell, _mean_std, budget_job, verdict

UPCYCLED = Variant("limoe-upcycled", "LIMoE upcycled from dense", "limoe")


@dataclass(frozen=True)
class UpcyclingStudy:
    size: Size
    steps: int  # N: the dense run's, and the upcycled run's own
    seeds: tuple[int, ...]


STUDIES = {"smoke": UpcyclingStudy(Size("w64"), 2, (0,)),
           "cpu": UpcyclingStudy(Size("w64"), 1150, (0, 1, 2))}


def plan_upcycling(scale: Scale, seeds: tuple[int, ...] | None = None, overrides: tuple[str, ...] = ()) -> list[Job]:
    """Seed by seed: dense N, its upcycled continuation, dense 2N, LIMoE 2N."""
    if scale.name not in STUDIES:
        raise ValueError(f"the upcycling study has no {scale.name} scale; it has {', '.join(STUDIES)}")
    study = STUDIES[scale.name]
    jobs = []
    for seed in seeds or study.seeds:
        parent = budget_job(scale, overrides, DENSE, study.size, study.steps, seed)
        base = budget_job(scale, overrides, LIMOE, study.size, study.steps, seed)
        # The LIMoE recipe at N steps, its weights from the dense run (paired init would be overwritten anyway).
        upcycled = Job(UPCYCLED, f"{study.size.name}-{2 * study.steps}", seed,
                       (*(o for o in base.overrides if o != "model.paired_init=true"),
                        f"init_from={RUNS}/{parent.name}"), base.model, base.preset, after=parent.name)
        jobs += [parent, upcycled, budget_job(scale, overrides, DENSE, study.size, 2 * study.steps, seed),
                 budget_job(scale, overrides, LIMOE, study.size, 2 * study.steps, seed)]
    return jobs


ARMS = (("dense", DENSE, 1), ("upcycled", UPCYCLED.name, 2), ("dense", DENSE, 2), ("LIMoE from scratch", LIMOE, 2))


def _arms(results: list[dict[str, Any]]) -> dict[tuple[str, int], dict[int, dict[str, Any]]]:
    """(variant, multiple of N) -> seed -> result; an upcycled run's training FLOPs include its dense parent's."""
    by_job = {r["job"]: r for r in results if "error" not in r}
    out: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in by_job.values():
        steps = r["steps"] * (2 if r["variant"] == UPCYCLED.name else 1)
        if r["variant"] == UPCYCLED.name:
            parent = by_job.get(f"{DENSE}-{r['size'].rsplit('-', 1)[0]}-{r['steps']}-s{r['seed']}")
            if parent is None:
                continue
            r = {**r, "train_flops": r["train_flops"] + parent["train_flops"]}
        out.setdefault((r["variant"], steps), {})[r["seed"]] = r
    return out


def rows(results: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    arms = _arms(results)
    out = []
    for name, variant, multiple in ARMS:
        runs = list(arms.get((variant, multiple * steps), {}).values())
        if runs:
            row = {"model": name, "steps": multiple * steps, "seeds": sorted(r["seed"] for r in runs),
                   "train_flops": runs[0]["train_flops"]}
            row.update({title: _mean_std([value_at(r, where) for r in runs]) for title, where, _, _ in METRICS})
            out.append(row)
    return out


def paired(results: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Upcycled minus each 2N-step model, seed by seed."""
    arms = _arms(results)
    upcycled = arms.get((UPCYCLED.name, 2 * steps), {})
    out = []
    for name, variant in (("dense", DENSE), ("LIMoE from scratch", LIMOE)):
        other = arms.get((variant, 2 * steps), {})
        seeds = sorted(upcycled.keys() & other.keys())
        if seeds:
            row = {"against": f"{name}, {2 * steps:,} steps", "seeds": seeds}
            row.update({title: _mean_std([value_at(upcycled[s], where) - value_at(other[s], where) for s in seeds])
                        for title, where, _, _ in METRICS})
            out.append(row)
    return out


def markdown(results: list[dict[str, Any]], jobs: list[Job], command: str, steps: int) -> str:
    lines = ["# limoe reproduce: sparse upcycling", "",
             f"`{command}`: dense trained {steps:,} steps, then LIMoE upcycled from it (each expert a copy of its "
             f"block's MLP, routers fresh) and trained {steps:,} more, against dense and LIMoE trained "
             f"{2 * steps:,} steps from scratch; the same data order per seed. Training GFLOPs of the upcycled "
             f"model include its dense start. Mean ± std over seeds.", "",
             "| model | steps | train GFLOPs | " + " | ".join(m[0] for m in METRICS) + " | seeds |",
             "|" + "---|" * (len(METRICS) + 4)]
    for row in rows(results, steps):
        cells = [_cell(row[title], scale, dec) for title, _, scale, dec in METRICS]
        steps_cell = f"{steps:,} + {steps:,}" if row["model"] == "upcycled" else f"{row['steps']:,}"
        lines.append(f"| {row['model']} | {steps_cell} | {row['train_flops'] / 1e9:,.0f} | " + " | ".join(cells)
                     + f" | {len(row['seeds'])} |")
    lines += ["", "## Upcycled minus each, paired by seed", "",
              "Ahead: by more than twice the std of the paired differences; level otherwise.", "",
              "| against | " + " | ".join(f"difference, {m[0]}" for m in METRICS) + " | seen / held-out top-1 "
              "| seeds |", "|" + "---|" * (len(METRICS) + 3)]
    for row in paired(results, steps):
        cells = [_cell(row[title], scale, dec, signed=True) for title, _, scale, dec in METRICS]
        who = {"LIMoE": "upcycled", "dense": "the other"}  # verdict's names for ahead / behind
        ahead = " / ".join(who.get(verdict(row[m[0]]), verdict(row[m[0]])) for m in METRICS[:2])
        lines.append(f"| {row['against']} | " + " | ".join(cells) + f" | {ahead} | {len(row['seeds'])} |")
    lines += ["", "## Commands", "", "Each run is one `limoe train` (RUNS: this study's runs folder):", "", "```"]
    lines += [f"{job.command()} --run-dir runs/{job.name}" for job in jobs]
    return "\n".join([*lines, "```", ""])
