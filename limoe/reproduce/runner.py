"""Run the jobs of a reproduction: train, evaluate beyond training's own metrics, and keep one result.json each.

A job whose result.json exists is not run again, and one that was interrupted resumes from its last checkpoint,
so `limoe reproduce` can be stopped and restarted without losing finished work.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from limoe.reproduce.metrics import (PROBE_SHOTS, final_train_loss, held_out_routing, probe_metrics,
                                    routing_summary, train_routing_success)
from limoe.reproduce.plan import Job

class Stopped(KeyboardInterrupt):
    """A signal stopped the reproduction; every interrupted run kept a checkpoint, so a rerun continues."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


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
    record = _read_json(record_path) if checkpoints else None
    if record is not None:
        state, _ = ckpt.read_state(checkpoints[-1])
        if record.get("command") == job.command() and state["step"] == cfg.steps and state.get("metrics"):
            return checkpoints[-1], state["metrics"], record
    start = time.perf_counter()
    run = train(cfg, resume="latest" if checkpoints else None, progress=False)
    if run.interrupted:
        raise Stopped(signal.Signals[run.interrupted], f"{job.name} stopped by {run.interrupted}; its checkpoint "
                      f"resumes it")
    record = {"command": job.command(), "seconds": time.perf_counter() - start, "resumed": bool(checkpoints),
              "chance": run.chance, "train_routing_success": train_routing_success(run_dir, cfg.steps)}
    write_json(record_path, record)
    return run.checkpoint, {k: v for k, v in run.metrics.items() if not k.startswith("train/")}, record


# Options that do not change what a run trains (resume is exact): where it is (a results folder moved or copied
# elsewhere), what it ran on, how often it saved and how many checkpoints it kept; where the run it started from
# is (the job's command names that run: RUNS/<name>).
_NOT_THE_RUN = {"device": None, "run_dir": None, "checkpoint_interval": None, "keep_last": None, "init_from": None}


def _same_config(run_dir: Path, cfg) -> bool:
    from limoe.train.config import load_config

    # As trained: a loss weight left to its default and the same weight written out are the same run.
    stored = load_config(str(run_dir / "config.json")).resolved().to_dict()
    return {**stored, **_NOT_THE_RUN} == {**cfg.resolved().to_dict(), **_NOT_THE_RUN}


def run_job(job: Job, out_dir: str | os.PathLike, device: str = "auto") -> dict[str, Any]:
    """Train one job (or resume it), evaluate it, and return its result, also written to <run dir>/result.json.

    Training happens once; the evaluation is redone when EVAL_VERSION changes, from the final checkpoint."""
    import limoe
    from limoe.model.registry import get_model_info
    from limoe.train.loop import pick_device

    start = time.perf_counter()
    done = finished_result(job, out_dir)
    if done is not None:
        return done
    run_dir = Path(out_dir) / "runs" / job.name
    if job.after and _read_json(Path(out_dir) / "runs" / job.after / RESULT_FILE) is None:
        raise ValueError(f"{job.name} starts from the run {job.after}, which has not finished")
    result_path = run_dir / RESULT_FILE
    command = job.command()
    cfg = job.config(str(run_dir))
    cfg.device = device
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
        "train_loss": final_train_loss(run_dir, steps),
        "metrics": {**metrics, **probe_metrics(model, cfg)},
    }
    if job.variant.is_limoe:
        result["train_routing_success"] = record["train_routing_success"]
        result["eval_routing"] = routing_summary(held_out_routing(model, tokenizer, cfg))
    # Training, the evaluations and the probe: what a run costs on the wall clock (train_seconds is the loop alone).
    result["run_seconds"] = time.perf_counter() - start
    write_json(result_path, result)
    return result


def finished_result(job: Job, out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The job's result if it finished as this plan and this evaluation version would run it, else None."""
    run_dir = Path(out_dir) / "runs" / job.name
    done = _read_json(run_dir / RESULT_FILE)
    # The whole config, not just the command: a changed default (e.g. the data) changes the run.
    if (done is not None and done.get("command") == job.command() and done.get("eval_version") == EVAL_VERSION
            and _same_config(run_dir, job.config(str(run_dir)))):
        return done
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    """A record this runner wrote, or None when it is missing or damaged (a disk filled up, an editor): both
    records are derived from the run's checkpoints, so a damaged one is made again, not a failure every rerun."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"limoe reproduce: {path} is unreadable ({e}); making it again", file=sys.stderr, flush=True)
        return None
    return data if isinstance(data, dict) else None


def check_run_folders(jobs: list[Job], out_dir: str | os.PathLike) -> None:
    """Refuse, before anything trains, run folders that hold a run of another configuration (an older plan)."""
    clashes = []
    for job in jobs:
        run_dir = Path(out_dir) / "runs" / job.name
        if (run_dir / "config.json").is_file() and not _same_config(run_dir, job.config(str(run_dir))):
            clashes.append(job.name)
    if clashes:
        raise ValueError(f"{Path(out_dir) / 'runs'} holds runs of another configuration (an older plan?): "
                         f"{', '.join(clashes[:4])}{' ...' if len(clashes) > 4 else ''}; move them away or use "
                         f"another --out")


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
        _run_in_processes(jobs, out_dir, parallel, device, done)
    sys.stdout.flush()
    return [results[job.name] for job in jobs]


def _job_process(job: Job, out_dir: str, device: str, parent_pid: int, conn) -> None:
    """One job in a spawned process of its own; its result, failure or interruption goes back through `conn`."""
    from limoe.data.workers import STOP_SIGNALS, die_with_parent

    # If `limoe reproduce` dies (kill -9), the run saves a checkpoint and stops instead of training on, orphaned.
    die_with_parent(parent_pid, signal.SIGTERM)
    try:
        # Started with the stop signals blocked (see _run_in_processes): one that came meanwhile arrives here.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        result = _run_logged(job, out_dir, device)
    except KeyboardInterrupt as e:  # a signal outside training, or training's own stop (Stopped)
        result = {"job": job.name, "interrupted": str(e)}
    conn.send(result)
    conn.close()


def _result_of(job: Job, receive, process, stopping: bool) -> dict[str, Any]:
    """What a finished job process sent, once it has exited; "interrupted" only when the reproduction is stopping
    (a signal sent to one run alone makes that run a failure)."""
    try:
        result = receive.recv()
    except EOFError:  # died without a word: killed (out of memory, a signal)
        result = {"job": job.name, "interrupted": "killed"} if stopping else {
            "job": job.name, "error": f"its process died (exit code {process.exitcode})",
            "error_log": "no log: the process was killed"}
    process.join()
    if "interrupted" in result and not stopping:
        result = {"job": job.name, "error": f"stopped by a signal ({result['interrupted']})",
                  "error_log": "no log: its checkpoint resumes it"}
    return result


def _run_in_processes(jobs: list[Job], out_dir: str, parallel: int, device: str,
                      done: Callable[[dict[str, Any]], None]) -> None:
    """Each job in a spawned process of its own, `parallel` at a time (a fresh process per run: no memory or
    state carried from run to run).

    SIGINT or SIGTERM stops it: no queued run starts, the running ones get SIGTERM (each saves a checkpoint at
    the end of its step and exits), and this waits for them, then raises Stopped. A second Ctrl-C kills them
    without waiting. Nothing outlives `limoe reproduce`."""
    from multiprocessing.connection import wait

    from limoe.data.workers import holding_stop_signals

    ctx = get_context("spawn")
    queue = list(jobs)
    running: dict[Any, tuple[Job, Any]] = {}  # the parent's end of a job's pipe -> (job, its process)
    stop: list[int] = []
    finished: dict[str, bool] = {}  # job name -> trained and evaluated (False: failed)
    planned = {job.name for job in jobs}

    def next_job() -> Job | None:
        """The first queued job whose starting run (if any) has finished; one whose starting run failed fails."""
        for job in list(queue):
            if job.after in planned and job.after not in finished:
                continue  # its starting run is queued or running
            queue.remove(job)
            if job.after is not None and not finished.get(job.after, True):
                done({"job": job.name, "error": f"the run it starts from, {job.after}, failed",
                      "error_log": "no log: it did not start"})
                finished[job.name] = False
                return next_job()
            return job
        return None

    def on_signal(signum, frame):
        if stop and signum == signal.SIGINT:
            for _, process in running.values():
                process.kill()
        stop.append(signum)
        for _, process in running.values():  # the group's Ctrl-C reached them too; a trainer stops once
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may take signals
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        while running or (queue and not stop):
            while queue and len(running) < parallel and not stop:
                job = next_job()
                if job is None:
                    if not running:  # every queued job waits for a run that nothing will finish
                        for waiting in queue:
                            done({"job": waiting.name, "error": f"waits for {waiting.after}, which never ran",
                                  "error_log": "no log: it did not start"})
                        queue.clear()
                    break
                receive, send = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_job_process, args=(job, out_dir, device, os.getpid(), send),
                                      name=f"limoe-reproduce-{job.name}")
                with holding_stop_signals(spawning=True):  # a Ctrl-C while Python starts up in it: no traceback
                    process.start()
                send.close()  # the child holds the other end: its exit, however it happens, ends the pipe
                running[receive] = (job, process)
            for receive in wait(list(running), timeout=1.0):  # signals are handled between waits
                job, process = running.pop(receive)
                result = _result_of(job, receive, process, stopping=bool(stop))
                if "interrupted" not in result:
                    finished[job.name] = "error" not in result
                    done(result)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for _, process in running.values():  # only left on an error of this loop itself
            process.kill()
            process.join()
    if stop:
        name = signal.Signals(stop[0]).name
        raise Stopped(stop[0], f"{name} received; unfinished runs kept their checkpoints")
