"""`limoe reproduce`: the paper's comparison at small scale on the built-in data, from one command.

    from limoe.reproduce import reproduce
    summary = reproduce("cpu", out_dir="runs/reproduce")   # trains, evaluates, writes results.md and plots

See plan.py for what is trained, runner.py for how, report.py for what is written.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from limoe.reproduce.metrics import PROBE_DRAWS, PROBE_SHOTS, held_out_routing
from limoe.reproduce.plan import SCALES, VARIANT_NAMES, VARIANTS, Job, Scale, plan_ablations, plan_jobs
from limoe.reproduce.report import (SEEN, SPECIALIST_SHARE, ZERO_SHOT, markdown_table, paired_table,
                                    plot_accuracy_vs_compute, plot_routing_success, routing_table, style_table,
                                    summary_rows, sweep_table)
from limoe.locks import folder_lock
from limoe.reproduce import scaling, upcycling
from limoe.reproduce.runner import check_run_folders, finished_result, run_jobs, write_json

STUDY_NAMES = ("paper", "scaling", "ablations", "upcycling")
__all__ = ["STUDY_NAMES", "SCALES", "VARIANTS", "VARIANT_NAMES", "Job", "Scale", "plan_jobs", "reproduce"]


def _best_limoe(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first-seed run of the LIMoE variant with the best mean seen-concept top-1 (without one, held-out-concept
    top-1) at the base size."""
    rows = [r for r in summary_rows(results) if r["variant"].startswith("limoe")]
    if not rows:
        return None
    key = SEEN if any(not math.isnan(r[SEEN][0]) for r in rows) else ZERO_SHOT
    best = max(rows, key=lambda r: -math.inf if math.isnan(r[key][0]) else r[key][0])
    runs = [r for r in results if r.get("variant") == best["variant"] and r.get("size") == "base"]
    return min(runs, key=lambda r: r["seed"])


def _specialisation(best: dict[str, Any], out_dir: Path) -> Path:
    """The routing report (HTML + PNGs) of the best LIMoE run on the held-out pairs."""
    import limoe
    from limoe import checkpoint as ckpt
    from limoe.analysis.report import write_report

    run_dir = out_dir / "runs" / best["job"]
    model, tokenizer, cfg = limoe.load_checkpoint(run_dir)
    analysis = held_out_routing(model, tokenizer, cfg)
    checkpoint = ckpt.resolve(run_dir)
    source = {"checkpoint": str(checkpoint), "step": ckpt.step_of(checkpoint),
              "data": f"the held-out pairs of data.source={cfg.data.source}"}
    write_report(analysis, out_dir / "analysis", metrics_path=run_dir / "metrics.jsonl", source=source)
    # The blog's specialisation bars, also beside results.md so the table and its pictures travel together.
    shutil.copyfile(out_dir / "analysis" / "modality_share.png", out_dir / "expert_specialisation.png")
    return out_dir / "analysis"


def reproduce(scale: str | Scale = "cpu", out_dir: str | Path = "runs/reproduce", seeds: tuple[int, ...] | None = None,
              variants: tuple[str, ...] | None = None, parallel: int | None = None, device: str = "auto",
              overrides: tuple[str, ...] = (), sweep: bool = True, study: str = "paper",
              report_only: bool = False, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every job of `scale` (skipping finished ones), then write results.md, results.json and plots.

    `study`: "paper" (the variants of the paper's comparison), "scaling" (dense and LIMoE across sizes and
    training lengths, limoe.reproduce.scaling), "ablations" (one factor of the full recipe at a time, plan.py) or
    "upcycling" (dense continued as an upcycled LIMoE, limoe.reproduce.upcycling: upcycling.md).
    `overrides`: `--set` strings applied to every run (e.g. "moe.num_experts=16"); `sweep=False` skips the paper
    study's accuracy-vs-compute sizes. `report_only`: train nothing; write the outputs from the finished runs
    (also while another invocation trains the rest)."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; known: {list(SCALES)}")
        scale = SCALES[scale]
    if study not in STUDY_NAMES:
        raise ValueError(f"unknown study {study!r}; known: {list(STUDY_NAMES)}")
    if study != "paper" and (variants or not sweep):
        raise ValueError(f"--variants and --no-sweep choose among the paper study's runs, not the {study} study's")
    out_dir = Path(out_dir)
    if study == "paper":
        jobs = plan_jobs(scale, variants, seeds, tuple(overrides), sweep)
    elif study == "scaling":
        jobs = scaling.plan_scaling(scale, seeds, tuple(overrides))
    elif study == "upcycling":
        jobs = upcycling.plan_upcycling(scale, seeds, tuple(overrides))
    else:
        jobs = plan_ablations(scale, seeds, tuple(overrides))
    for job in jobs:  # every config is checked before anything trains
        job.config(str(out_dir / "runs" / job.name))
    parallel = parallel or (scaling.STUDIES[scale.name].parallel if study in ("scaling", "upcycling")
                            else scale.parallel)
    command = " ".join(["limoe reproduce --scale", scale.name, *([f"--study {study}"] if study != "paper" else []),
                        *([f"--seeds {','.join(map(str, seeds))}"] if seeds else []),
                        *([f"--variants {','.join(variants)}"] if variants else []),
                        *(f"--set {o}" for o in overrides), *([] if sweep else ["--no-sweep"])])
    write = {"scaling": _write_scaling, "upcycling": _write_upcycling}.get(study, _write_paper)
    if report_only:
        results = [r for r in (finished_result(job, out_dir) for job in jobs) if r is not None]
        if not results:
            raise ValueError(f"{out_dir} holds no finished run of this plan to report")
        summary = write(scale, study, jobs, results, out_dir, None, command)
        report(f"limoe reproduce: {len(results)} of {len(jobs)} runs finished; {out_dir / _written(study)}")
        return summary
    with folder_lock(out_dir, "limoe reproduce"):  # a second reproduction here would train every run again
        check_run_folders(jobs, out_dir)
        _build_data(jobs[0])
        report(f"limoe reproduce: {scale.name} scale, {study} study: {len(jobs)} runs, {parallel} at a time "
               f"-> {out_dir}")
        start = time.perf_counter()
        results = run_jobs(jobs, out_dir, parallel, device, report)
        minutes = (time.perf_counter() - start) / 60
        summary = write(scale, study, jobs, results, out_dir, minutes, command)
        done = [r for r in results if "error" not in r]
        if study != "upcycling":
            report("\n" + (scaling.paired_table(done) if study == "scaling" else markdown_table(done)))
        report(f"\nlimoe reproduce: {len(done)} runs done, {len(results) - len(done)} failed, {minutes:.1f} min; "
               f"{out_dir / _written(study)}")
        return summary


def _write_scaling(scale: Scale, study: str, jobs: list[Job], results: list[dict[str, Any]], out_dir: Path,
                   minutes: float | None, command: str) -> dict[str, Any]:
    done = [r for r in results if "error" not in r]
    plot = scaling.plot(done, out_dir / "quality_vs_compute.png")
    summary = {"study": study, "scale": scale.name, "minutes": minutes, "machine": platform.platform(),
               "runs": results, "rows": scaling.rows(done), "paired": scaling.paired(done),
               "failed": [r["job"] for r in results if "error" in r]}
    write_json(out_dir / "results.json", summary)
    (out_dir / "results.md").write_text(scaling.markdown(done, jobs, command, minutes, plot), encoding="utf-8")
    return summary


def _written(study: str) -> str:
    return "upcycling.md" if study == "upcycling" else "results.md"


def _write_upcycling(scale: Scale, study: str, jobs: list[Job], results: list[dict[str, Any]], out_dir: Path,
                     minutes: float | None, command: str) -> dict[str, Any]:
    done = [r for r in results if "error" not in r]
    steps = upcycling.STUDIES[scale.name].steps
    summary = {"study": study, "scale": scale.name, "minutes": minutes, "machine": platform.platform(),
               "runs": results, "rows": upcycling.rows(done, steps), "paired": upcycling.paired(done, steps),
               "failed": [r["job"] for r in results if "error" in r]}
    write_json(out_dir / "upcycling.json", summary)
    (out_dir / "upcycling.md").write_text(upcycling.markdown(done, jobs, command, steps), encoding="utf-8")
    return summary


def _write_paper(scale: Scale, study: str, jobs: list[Job], results: list[dict[str, Any]], out_dir: Path,
                 minutes: float | None, command: str) -> dict[str, Any]:
    """results.md, results.json and the plots of the paper study, or of the ablations (the same tables);
    `minutes` None: --report-only."""
    minutes = 0.0 if minutes is None else minutes
    failed = [r for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    paths = {"accuracy_vs_compute": plot_accuracy_vs_compute(done, out_dir / "accuracy_vs_compute.png"),
             "routing_success": plot_routing_success(done, out_dir / "routing_success.png")}
    best = _best_limoe(done)
    if best is not None:
        paths["analysis"] = _specialisation(best, out_dir)
    summary = {"study": study, "scale": scale.name, "minutes": minutes, "machine": platform.platform(),
               "runs": results, "summary": summary_rows(done), "failed": [r["job"] for r in failed],
               "best_limoe": best["job"] if best else None}
    write_json(out_dir / "results.json", summary)
    (out_dir / "results.md").write_text(_markdown(scale, done, paths, best, minutes, jobs, command),
                                        encoding="utf-8")
    return summary


def _train_minutes(results) -> float:
    return sum(r["train_seconds"] for r in results) / 60


def _build_data(job: Job) -> None:
    """Build the runs' data once, before parallel workers would race to build it."""
    from limoe.data import build_builtin_dataset
    from limoe.train.data import builtin_config, corpus_config

    cfg = job.config("")
    build_builtin_dataset(builtin_config(cfg))  # the built-in set: the data, or the probe's images
    if cfg.data.source == "corpus":
        from limoe.data.corpus import build_corpus

        build_corpus(corpus_config(cfg))


def _markdown(scale: Scale, results, paths, best, minutes: float, jobs: list[Job], command: str) -> str:
    parts = [f"# limoe reproduce: {scale.name} scale", "", f"`{command}`: {scale.description}.", "",
             f"{len(results)} runs; their training took {_train_minutes(results):.0f} min in "
             f"all, and this invocation {minutes:.1f} min (finished runs are not trained again). Seen: classify "
             f"unseen renderings of concepts trained on in other renderings by their names, among all of that "
             f"test's concepts; held-out: the same for images of concepts never trained on, in any rendering; "
             f"held-out loss: the contrastive loss on fixed batches of 128 of their image-caption pairs, "
             f"which retrieval also ranks; "
             f"{PROBE_SHOTS}-shot probe: ridge regression on frozen image embeddings of the built-in OpenMoji "
             f"colour emoji (both splits) into Unicode subcategories "
             f"(animal-mammal, food-fruit, ...; one image per concept, balanced accuracy, mean of "
             f"{PROBE_DRAWS} draws of the shots). Mean ± std over seeds.",
             "", markdown_table(results), ""]
    paired = paired_table(results)
    if paired:
        parts += ["## (f) against each variant, paired by seed", "", "Seed i of (f) minus seed i of the variant: "
                  "positive top-1 and negative loss favour (f); bold: beyond twice the spread of the "
                  "differences.", "", paired, ""]
    styles = style_table(results)
    if styles:
        parts += ["## Zero-shot per style", "", "Top-1 % on each style's images of the seen and of the held-out "
                  "concepts, each scored against every class of its test (so styles compare with each other and "
                  "with the pooled columns above). A style left out of training (`data.corpus_styles`) is still "
                  "tested here.", "", styles, ""]
    parts += ["## Routing of the LIMoE variants", "",
              "Routing success: share of a modality's tokens whose top-1 expert had room (training steps of the "
              "second half; held-out pairs encoded as in training, in the model's routing groups, with eval "
              "capacity). Effective experts: exp(entropy) of "
              f"where a modality's tokens go, from 1 (all to one expert) to the number of experts. An image (text) "
              f"expert processes >= {SPECIALIST_SHARE:.0%} image (text) tokens. Expert Choice: routing success is the "
              f"share of tokens at least one expert picked. Soft MoE drops nothing (100% by construction); its "
              f"experts and shares count each token's heaviest expert (largest combine weight).", "",
              routing_table(results), ""]
    if any(r["size"] != "base" for r in results):
        parts += ["## Accuracy vs compute", "", sweep_table(results), ""]
    for name, title in (("accuracy_vs_compute", "accuracy vs compute"), ("routing_success", "routing success")):
        if paths.get(name):
            parts.append(f"![{title}]({Path(paths[name]).name})")
    if best is not None:
        parts += ["", f"Expert specialisation of the best LIMoE ({best['label']}, seed {best['seed']}) on the held-out "
                      f"pairs; its whole routing report is `analysis/index.html` in the output folder:", "",
                  "![expert modality shares](expert_specialisation.png)"]
    parts += ["", "## Commands", "", "Each run is one `limoe train`:", "", "```"]
    parts += [f"{job.command()} --run-dir runs/{job.name}" for job in jobs]
    parts += ["```", ""]
    return "\n".join(parts)

