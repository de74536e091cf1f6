"""`limoe reproduce --parallel 2` stopped by a signal in each phase: it exits with one line and 128 + the signal,
every started run keeps a checkpoint, no process outlives it, and the same command then finishes the runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from limoe import checkpoint as ckpt
from limoe.reproduce import SCALES, plan_jobs, reproduce

from _processes import group_gone

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--scale", "smoke", "--parallel", "2", "--variants", "dense,two-tower", "--seeds", "0,1", "--no-sweep",
        "--set", "steps=400"]  # the smoke preset saves every 10 steps
JOBS = plan_jobs(SCALES["smoke"], variants=("dense", "two-tower"), seeds=(0, 1), overrides=("steps=400",),
                 sweep=False)
RUNNING, QUEUED = JOBS[:2], JOBS[2:]  # the first two start at once


def _start(out: Path) -> subprocess.Popen:
    log = out.parent / "log"
    log.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "limoe.cli", "reproduce", *ARGS, "--out", str(out)],
                            stdout=open(log / "out", "w"), stderr=open(log / "err", "w"), cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"never reached the phase (exit code {proc.returncode})")
        time.sleep(0.1)


def _saved_steps(out: Path) -> list[int]:
    return [ckpt.step_of(c[-1]) if (c := ckpt.list_checkpoints(out / "runs" / job.name)) else 0 for job in RUNNING]


@pytest.mark.slow
@pytest.mark.parametrize("sig, target", [(signal.SIGINT, "group"), (signal.SIGTERM, "main"),
                                         (signal.SIGKILL, "main")])
def test_a_signal_while_runs_train(tmp_path, sig, target):
    out = tmp_path / "out"
    proc = _start(out)
    _wait_for(lambda: all(_saved_steps(out)), proc)
    seen = _saved_steps(out)
    (os.killpg if target == "group" else os.kill)(proc.pid, sig)
    proc.wait(timeout=60)
    assert group_gone(proc.pid), "a process of the reproduction outlived it"
    err = (tmp_path / "log" / "err").read_text()
    saved = _saved_steps(out)
    # Each run saved where it stopped (also when the reproduction itself was killed: its runs got SIGTERM).
    assert all(seen[i] < saved[i] < 400 for i in range(len(RUNNING))), (seen, saved, err)
    assert not any((out / "runs" / job.name).exists() for job in QUEUED), "a queued run started after the signal"
    assert not (out / "results.md").exists()
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig and "Traceback" not in err, err
        assert f"interrupted ({sig.name} received" in err.splitlines()[-1], err
    if sig == signal.SIGTERM:  # the same command finishes the runs from their checkpoints
        summary = reproduce("smoke", out, seeds=(0, 1), variants=("dense", "two-tower"), parallel=2,
                            overrides=("steps=400",), sweep=False, report=lambda line: None)
        assert summary["failed"] == [] and [r["resumed"] for r in summary["runs"]] == [True, True, False, False]
        assert (out / "results.md").is_file()


@pytest.mark.slow
def test_a_signal_while_runs_start(tmp_path):
    """Ctrl-C while the runs' processes start up (Python and torch importing): no traceback from any of them."""
    out = tmp_path / "out"
    proc = _start(out)
    _wait_for(lambda: "limoe reproduce:" in (tmp_path / "log" / "out").read_text(), proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    assert group_gone(proc.pid)
    err = (tmp_path / "log" / "err").read_text()
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err


CHILD_MASK_SCRIPT = """
import signal
from multiprocessing import get_context

from limoe.data.workers import holding_stop_signals


def report_mask(conn):
    conn.send(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))


if __name__ == "__main__":
    ctx = get_context("spawn")
    for _ in range(2):  # the first start is the one that also starts multiprocessing's resource tracker
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=report_mask, args=(send,))
        with holding_stop_signals(spawning=True):
            process.start()
        print(receive.recv())
        process.join()
    print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signal masks")
def test_every_spawned_process_starts_with_the_stop_signals_blocked(tmp_path):
    """A run's process (spawned) must start with SIGINT blocked, so that a Ctrl-C during its imports stays pending: this
    is what made a Ctrl-C while runs start print a traceback from the first run's interpreter start-up. A fresh
    interpreter, so that its first start also starts the resource tracker; the parent's mask is restored after."""
    script = tmp_path / "child_mask.py"
    script.write_text(CHILD_MASK_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "False"], proc.stdout
