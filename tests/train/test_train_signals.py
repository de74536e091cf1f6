"""A real signal, to the trainer or to its whole process group (what schedulers send), in every phase of a run:
the trainer exits with one line and 128 + the signal number, leaves a checkpoint the run resumes from, and no
data-loader worker outlives it."""

import json
import os
import signal
import subprocess
import sys

import pytest

from limoe import checkpoint as ckpt
from limoe.train import train

from _processes import group_gone
from _train_utils import tiny_config

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where _signal_driver.py lives


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin")


def _drive(sig: str, target: str, phase: str, config) -> tuple[subprocess.Popen, str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), TESTS]))
    proc = subprocess.Popen([sys.executable, os.path.join(TESTS, "_signal_driver.py"), sig, target, phase,
                             str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # a hang: take its whole group down, so nothing outlives the test run
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        proc.kill()
    return proc, out, err


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["step", "data", "eval", "final"])
@pytest.mark.parametrize("target", ["main", "group"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_matrix(tmp_path, cache, sig, target, phase):
    cfg = tiny_config(tmp_path, cache, steps=8, checkpoint_interval=0)
    cfg.data.in_memory, cfg.data.num_workers = False, 2  # streamed by worker processes
    cfg.eval.interval = 0 if phase == "final" else 2
    config = tmp_path / "config.json"
    config.write_text(cfg.to_json())
    proc, out, err = _drive(sig.name, target, "eval" if phase == "final" else phase, config)
    assert proc.returncode == 128 + sig, (out, err)
    assert "Traceback" not in err and f"{sig.name} received" in out, (out, err)
    assert group_gone(proc.pid, timeout=10), "a process of the trainer's group outlived it"
    saved = ckpt.resolve("latest", cfg.run_dir)
    state, _ = ckpt.read_state(saved)
    assert state["step"] == (8 if phase == "final" else 2 if phase == "eval" else state["step"]) >= 1
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    assert train(cfg, resume="latest", progress=False).step == 8


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["crash", "worker-dies"])
def test_failure_with_streaming_workers_exits(tmp_path, cache, phase):
    """A bug in a step ends the trainer with its traceback, and a killed loader worker with one line; neither
    leaves the trainer waiting for its other workers (they ignore the group's SIGTERM, not their parent's)."""
    cfg = tiny_config(tmp_path, cache, steps=8, checkpoint_interval=0)
    cfg.data.in_memory, cfg.data.num_workers = False, 2
    config = tmp_path / "config.json"
    config.write_text(cfg.to_json())
    proc, out, err = _drive("SIGTERM", "main", phase, config)
    if phase == "crash":
        assert proc.returncode == 1 and "RuntimeError: a bug in the third step" in err, (out, err)
    else:
        assert proc.returncode == 2 and "Traceback" not in err, (out, err)
        assert "is killed by signal: Killed" in err and "lower data.num_workers" in err, err
    assert group_gone(proc.pid, timeout=10), "a process of the trainer's group outlived it"


@pytest.mark.slow
def test_signal_inside_an_image_decode_stops_the_evaluation(tmp_path, cache):
    """The signal's exception raised inside the decoder's catch-all must not become a "corrupt image": the
    evaluation stops, and neither its metrics nor a skip are recorded."""
    cfg = tiny_config(tmp_path, cache, steps=8, checkpoint_interval=0)
    cfg.data.in_memory = False  # evaluation images are decoded as they are read, in the trainer itself
    cfg.eval.interval = 2
    config = tmp_path / "config.json"
    config.write_text(cfg.to_json())
    proc, out, err = _drive("SIGTERM", "main", "decode", config)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (out, err)
    assert ckpt.read_state(ckpt.resolve("latest", cfg.run_dir))[0]["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and not [r for r in records if r.get("kind") == "eval"], records
    assert "corrupt" not in out + err and "skipped" not in out + err, (out, err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_training_starts_is_one_line(tmp_path, cache, sig):
    cfg = tiny_config(tmp_path, cache, steps=8)
    config = tmp_path / "config.json"
    config.write_text(cfg.to_json())
    proc, out, err = _drive(sig.name, "main", "setup", config)
    assert proc.returncode == 128 + sig and "Traceback" not in err, (out, err)
    said = "interrupted" if sig == signal.SIGINT else "SIGTERM received"
    assert err.strip().splitlines()[-1] == f"limoe: {said}: stopped without saving", err
    assert group_gone(proc.pid, timeout=10)
