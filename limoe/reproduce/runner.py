"""Run the jobs of a reproduction: train, evaluate beyond training's own metrics, and keep one result.json each.

A job whose result.json exists is not run again, and one that was interrupted resumes from its last checkpoint,
so `limoe reproduce` can be stopped and restarted without losing finished work.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from limoe.reproduce.metrics import (PROBE_SHOTS, held_out_routing, probe_metrics, routing_summary,
                                    train_routing_success)
from limoe.reproduce.plan import Job

RESULT_FILE = "result.json"  # the evaluated result of a job
TRAIN_FILE = "train.json"  # what training alone produced (time, routing during training)
EVAL_VERSION = 3  # bump when the evaluation changes: finished runs are then re-evaluated, not retrained


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader never sees half a file, and a crash leaves the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finite(x: Any) -> Any:
    """NaN (a metric over nothing) as null: results.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _train_once(job: Job, cfg, run_dir: Path) -> tuple[Path, dict[str, float], dict[str, Any]]:
    """(final checkpoint, its held-out metrics, training record): trains, resumes, or finds the run finished."""
    from limoe import checkpoint as ckpt
    from limoe.train import train

    record_path = run_dir / TRAIN_FILE
    checkpoints = ckpt.list_checkpoints(run_dir)
    if (run_dir / "config.json").is_file() and not _same_config(run_dir, cfg):
        raise ValueError(f"{run_dir} holds a run of another configuration (an older plan?); move it away or "
                         f"use another --out")
    if record_path.is_file() and checkpoints:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        state, _ = ckpt.read_state(checkpoints[-1])
        if record.get("command") == job.command() and state["step"] == cfg.steps and state.get("metrics"):
            return checkpoints[-1], state["metrics"], record
    start = time.perf_counter()
    run = train(cfg, resume="latest" if checkpoints else None, progress=False)
    if run.interrupted:
        raise KeyboardInterrupt(f"{job.name} stopped by {run.interrupted}; its checkpoint resumes it")
    record = {"command": job.command(), "seconds": time.perf_counter() - start, "resumed": bool(checkpoints),
              "chance": run.chance, "train_routing_success": train_routing_success(run_dir, cfg.steps)}
    write_json(record_path, record)
    return run.checkpoint, {k: v for k, v in run.metrics.items() if not k.startswith("train/")}, record


# Options that do not change what a run trains (resume is exact): where it is (a results folder moved or copied
# elsewhere), what it ran on, how often it saved and how many checkpoints it kept.
_NOT_THE_RUN = {"device": None, "run_dir": None, "checkpoint_interval": None, "keep_last": None}


def _same_config(run_dir: Path, cfg) -> bool:
    from limoe.train.config import load_config

    stored = load_config(str(run_dir / "config.json")).to_dict()
    return {**stored, **_NOT_THE_RUN} == {**cfg.to_dict(), **_NOT_THE_RUN}


def run_job(job: Job, out_dir: str | os.PathLike, device: str = "auto") -> dict[str, Any]:
    """Train one job (or resume it), evaluate it, and return its result, also written to <run dir>/result.json.

    Training happens once; the evaluation is redone when EVAL_VERSION changes, from the final checkpoint."""
    import limoe
    from limoe.model.registry import get_model_info
    from limoe.train.loop import pick_device

    start = time.perf_counter()
    run_dir = Path(out_dir) / "runs" / job.name
    result_path = run_dir / RESULT_FILE
    command = job.command()
    cfg = job.config(str(run_dir))
    cfg.device = device
    if result_path.is_file():
        done = json.loads(result_path.read_text(encoding="utf-8"))
        # The whole config, not just the command: a changed default (e.g. the data) changes the run.
        if (done.get("command") == command and done.get("eval_version") == EVAL_VERSION
                and _same_config(run_dir, cfg)):
            return done
    checkpoint, metrics, record = _train_once(job, cfg, run_dir)

    model, tokenizer, _ = limoe.load_checkpoint(checkpoint, device=pick_device(cfg.device))
    info = get_model_info(cfg.model_config())
    steps = cfg.steps
    result = {
        "job": job.name, "variant": job.variant.name, "label": job.variant.label, "size": job.size,
        "seed": job.seed, "model": cfg.model, "command": command, "eval_version": EVAL_VERSION, "steps": steps,
        "batch_size": cfg.data.batch_size, "total_params": info.total_params, "active_params": info.active_params,
        # Forward + backward ~ 3x the forward's FLOPs, per pair: the compute the run spent, MoE counted at K = 1.
        "train_flops": 3 * info.flops_per_pair * cfg.data.batch_size * steps,
        "train_seconds": record["seconds"], "resumed": record["resumed"], "chance": record["chance"],
        "metrics": {**metrics, **probe_metrics(model, cfg)},
    }
    if job.variant.is_limoe:
        result["train_routing_success"] = record["train_routing_success"]
        result["eval_routing"] = routing_summary(held_out_routing(model, tokenizer, cfg))
    # Training, the evaluations and the probe: what a run costs on the wall clock (train_seconds is the loop alone).
    result["run_seconds"] = time.perf_counter() - start
    write_json(result_path, result)
    return result


def _run_logged(job: Job, out_dir: str, device: str) -> dict[str, Any]:
    """run_job in a worker process: a failure comes back as a record instead of killing the pool."""
    try:
        return run_job(job, out_dir, device)
    except Exception as e:  # noqa: BLE001 - one bad job must not stop the others; the error is reported
        log = Path(out_dir) / "runs" / job.name / "error.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc(), encoding="utf-8")
        return {"job": job.name, "error": f"{type(e).__name__}: {e}", "error_log": str(log)}


def run_jobs(jobs: list[Job], out_dir: str | os.PathLike, parallel: int = 1, device: str = "auto",
             report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every job (`parallel` at once in spawned processes); results in job order, failures as records."""
    out_dir = str(out_dir)
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()

    def done(result: dict[str, Any]) -> None:
        results[result["job"]] = result
        elapsed = time.perf_counter() - start
        if "error" in result:
            report(f"[{len(results)}/{len(jobs)}] {result['job']}: FAILED {result['error']} ({result['error_log']})")
            return
        m = {k: math.nan if v is None else v for k, v in result["metrics"].items()}
        seen = f"seen top-1 {100 * m['seen/top1']:.2f}%, " if "seen/top1" in m else ""
        report(f"[{len(results)}/{len(jobs)}] {result['job']}: {seen}held-out top-1 {100 * m['zero_shot/top1']:.2f}%, "
               f"{PROBE_SHOTS}-shot probe {100 * m.get(f'linear_probe/{PROBE_SHOTS}shot_balanced', math.nan):.1f}%, "
               f"{result['train_seconds']:.0f} s training, {result.get('run_seconds', math.nan):.0f} s in all "
               f"(elapsed {elapsed / 60:.1f} min)")

    if parallel <= 1:
        for job in jobs:
            done(_run_logged(job, out_dir, device))
    else:
        with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_run_logged, job, out_dir, device) for job in jobs]
            for future in as_completed(futures):
                done(future.result())
    sys.stdout.flush()
    return [results[job.name] for job in jobs]
