"""Never lose work: a signal in any phase saves (or keeps) a resumable checkpoint, resume keeps the metrics file
and the run honest, and a run folder that cannot be written is one line.

The signals here are sent by the process to itself from inside the phase under test (a patched evaluation or
loss), so each case lands exactly where it should; tests/train/test_train_signals.py sends real ones from outside.
"""

import json
import os
import signal

import pytest

from limoe import checkpoint as ckpt
from limoe.train import TrainingError, train
from limoe.train import loop
from limoe.train import step as step_module

from _train_utils import tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin")


def _signal_during_evaluation(monkeypatch, sig, at_step=None):
    """Make the evaluation at `at_step` (any when None) receive `sig` half-way; returns the evaluated steps."""
    real, seen = loop.held_out, []

    def held_out(*args, **kwargs):
        seen.append(len(seen))
        if at_step is None or len(seen) == at_step:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "held_out", held_out)
    return seen


def _records(run_dir, kind=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_evaluation_keeps_the_final_checkpoint(tmp_path, cache, monkeypatch, sig,
                                                                         capsys):
    cfg = tiny_config(tmp_path, cache, steps=4, checkpoint_interval=0)
    _signal_during_evaluation(monkeypatch, sig)
    result = train(cfg, progress=False)
    assert result.interrupted == sig.name and result.metrics == {}
    assert result.checkpoint.name == "step_00000004"
    assert "during the final evaluation: saved" in capsys.readouterr().out
    state, _ = ckpt.read_state(ckpt.resolve("latest", cfg.run_dir))
    assert state["step"] == 4
    # Resuming the finished run only evaluates, and leaves one final record in the metrics file.
    monkeypatch.undo()
    again = train(cfg, resume="latest", progress=False)
    assert again.step == 4 and again.interrupted is None and "zero_shot/top1" in again.metrics
    assert ckpt.read_state(again.checkpoint)[0]["metrics"] == again.metrics
    assert [r["step"] for r in _records(tmp_path / "run", "final")] == [4]


def test_a_signal_during_a_periodic_evaluation_saves_and_resumes_exactly(tmp_path, cache, monkeypatch):
    straight = train(tiny_config(tmp_path / "a", cache, steps=6, checkpoint_interval=0), progress=False)
    cfg = tiny_config(tmp_path / "b", cache, steps=6, checkpoint_interval=0)
    cfg.eval.interval = 2
    _signal_during_evaluation(monkeypatch, signal.SIGTERM, at_step=2)  # the evaluation at step 4
    first = train(cfg, progress=False)
    assert first.interrupted == "SIGTERM" and first.step == 4
    monkeypatch.undo()
    second = train(cfg, resume="latest", progress=False)
    assert first.losses + second.losses == straight.losses  # evaluations draw no random numbers
    assert [r["step"] for r in _records(tmp_path / "b" / "run", "train")] == [2, 4, 6]


def test_a_signal_during_a_step_saves_that_step(tmp_path, cache, monkeypatch):
    real, calls = step_module.compute_losses, []

    def compute_losses(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "compute_losses", compute_losses)
    result = train(tiny_config(tmp_path, cache, steps=6), progress=False)
    assert result.interrupted == "SIGINT" and result.step == 3 and result.checkpoint.name == "step_00000003"


def test_resume_keeps_each_step_once_in_the_metrics_file(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, steps=6, checkpoint_interval=2, log_interval=1)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    train(cfg, stop_after=5, progress=False)  # logged steps 1-5, checkpoint at 5
    (tmp_path / "run" / "metrics.jsonl").open("a").write('{"kind": "train", "st')  # a line torn by a kill
    ckpt_4 = ckpt.checkpoints_dir(cfg.run_dir) / "step_00000004"
    train(cfg, resume=str(ckpt_4), progress=False)  # an older checkpoint: steps 5-6 are replayed
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_another_runs_checkpoint_unless_forked(tmp_path, cache):
    cfg = tiny_config(tmp_path / "a", cache, steps=3)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    source = train(cfg, stop_after=2, progress=False).checkpoint
    cfg.run_dir = str(tmp_path / "b")
    with pytest.raises(TrainingError, match="belongs to the run .* pass --fork"):
        train(cfg, resume=str(source), progress=False)
    assert not (tmp_path / "b").exists()
    forked = train(cfg, resume=str(source), progress=False, fork=True)
    assert forked.step == 3 and forked.checkpoint.parent.parent == tmp_path / "b"
    assert (tmp_path / "b" / "config.json").is_file()


def test_resume_refuses_another_model_unless_forked(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, steps=3)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    train(cfg, stop_after=2, progress=False)
    cfg.moe["capacity_factor"] = 2.0  # same weights, different routing: a different model
    with pytest.raises(TrainingError, match=r"trained as another model \(moe: .*capacity_factor.*--fork"):
        train(cfg, resume="latest", progress=False)
    assert train(cfg, resume="latest", progress=False, fork=True).step == 3


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, cache):
    (tmp_path / "run").write_text("a file where the run folder should be")
    with pytest.raises(TrainingError) as info:
        train(tiny_config(tmp_path, cache, steps=2), progress=False)
    assert "run" in str(info.value) and "\n" not in str(info.value)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, cache, monkeypatch):
    cfg = tiny_config(tmp_path, cache, steps=6, checkpoint_interval=2)
    real, saves = ckpt.save._fsync_write, []

    def full_after_the_first_checkpoint(path, data):
        saves.append(path)
        if "step_00000004" in str(path):
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt.save, "_fsync_write", full_after_the_first_checkpoint)
    with pytest.raises(TrainingError, match="No space left on device") as info:
        train(cfg, progress=False)
    assert "\n" not in str(info.value)
    assert [p.name for p in ckpt.checkpoints_dir(cfg.run_dir).iterdir()] == ["step_00000002"]  # no leftovers
