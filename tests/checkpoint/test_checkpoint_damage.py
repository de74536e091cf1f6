"""Damaged checkpoints: every damage is one CheckpointError line on load and on resume, never a traceback, never
a silent fallback to an older step; replacing a step never leaves a moment without a complete copy."""

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import limoe
from limoe import checkpoint as ckpt
from limoe.cli import main
from limoe.train import train

from _train_utils import tiny_config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damage")
    cfg = tiny_config(tmp, steps=4, checkpoint_interval=2)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    train(cfg, progress=False)
    return cfg


@pytest.fixture
def run(pristine, tmp_path):
    """A copy of a finished 4-step run (checkpoints at steps 2 and 4) and its config, to damage."""
    shutil.copytree(pristine.run_dir, tmp_path / "run")
    cfg = tiny_config(tmp_path, pristine.data.cache_dir, steps=6, checkpoint_interval=2)
    cfg.eval.zero_shot = cfg.eval.retrieval = False
    return tmp_path / "run", cfg


def _latest(run_dir):
    return ckpt.checkpoints_dir(run_dir) / "step_00000004"


def _nan_weights(path):
    weights = load_file(path / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, path / "model.safetensors")


DAMAGE = {
    "config.json not JSON": lambda p: (p / "config.json").write_text("{not json"),
    "config.json a list": lambda p: (p / "config.json").write_text("[1, 2]"),
    "model.json not JSON": lambda p: (p / "model.json").write_bytes(b"\xff\xfe garbage"),
    "model.json unknown key": lambda p: (p / "model.json").write_text('{"kind": "limoe", "colour": 3}'),
    "state.json not JSON": lambda p: (p / "state.json").write_text('{"step": 4, '),
    "state.json without a step": lambda p: (p / "state.json").write_text('{"data": {}}'),
    "tokenizer.json garbage": lambda p: (p / "tokenizer.json").write_text('{"model": 42}'),
    "model.safetensors truncated": lambda p: os.truncate(p / "model.safetensors", 1000),
    "model.safetensors header garbage": lambda p: (p / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{{"),
    "optimizer.safetensors truncated": lambda p: os.truncate(p / "optimizer.safetensors",
                                                             os.path.getsize(p / "optimizer.safetensors") // 2),
    "NaN weights": _nan_weights,
}


def _one_line(error) -> str:
    assert "\n" not in str(error)
    return str(error)


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_damage_is_one_line_on_resume_and_on_load(run, damage, capsys):
    run_dir, cfg = run
    DAMAGE[damage](_latest(run_dir))
    if not damage.startswith("config.json"):  # the Python API resumes with the config it is given
        with pytest.raises(ckpt.CheckpointError) as info:
            train(cfg, resume="latest", progress=False)
        assert str(_latest(run_dir)) in _one_line(info.value)
    # The command line says the same in one line (exit 2), whichever file it reads first.
    assert main(["train", "--resume", "latest", "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("limoe: error:"), err
    if damage in ("state.json not JSON", "state.json without a step", "optimizer.safetensors truncated"):
        limoe.load_checkpoint(run_dir)  # loading for inference reads only the model's files
    else:
        with pytest.raises(ckpt.CheckpointError):
            limoe.load_checkpoint(run_dir)


@pytest.mark.parametrize("name", ckpt.FILES)
def test_truncation_anywhere_in_any_file_is_refused(run, name):
    run_dir, cfg = run
    file = _latest(run_dir) / name
    if name == "config.json":
        cfg = None  # read by the command line, which rebuilds the run's config from it
    data = file.read_bytes()
    rng = random.Random(name)
    for length in sorted(rng.sample(range(1, len(data) - 2), 4)):
        file.write_bytes(data[:length])
        with pytest.raises(Exception) as info:
            if cfg is None:
                limoe.load_checkpoint(run_dir)
            else:
                train(cfg, resume="latest", progress=False)
        assert isinstance(info.value, ckpt.CheckpointError), repr(info.value)
        _one_line(info.value)


def test_a_damaged_latest_is_reported_not_skipped(run):
    run_dir, cfg = run
    (_latest(run_dir) / "optimizer.safetensors").unlink()
    damaged = r"step_00000004: damaged checkpoint \(missing optimizer.safetensors\); the newest complete one is "
    with pytest.raises(ckpt.CheckpointError, match=damaged + r".*step_00000002"):
        ckpt.resolve("latest", run_dir)
    with pytest.raises(ckpt.CheckpointError, match="damaged checkpoint"):
        limoe.load_checkpoint(run_dir)
    older = ckpt.checkpoints_dir(run_dir) / "step_00000002"
    assert train(cfg, resume=str(older), progress=False).step == 6  # the older one, asked for explicitly


def test_a_kill_while_replacing_a_step_keeps_a_complete_copy(run, monkeypatch):
    run_dir, cfg = run
    real = os.replace
    calls = []

    def killed_after_the_first_rename(src, dst):
        if "step_00000004" in str(dst):  # os is shared: count only this checkpoint's renames
            calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for SIGKILL between the two renames
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_the_first_rename)
    cfg.steps = 4
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume="latest", progress=False)  # a finished run resumed: saves step 4 again
    monkeypatch.undo()
    assert not (ckpt.checkpoints_dir(run_dir) / "step_00000004").exists()
    # The moved-away copy still counts: resume finds it, and a fresh run refuses to start over it.
    assert ckpt.resolve("latest", run_dir).name == ".old-step_00000004"
    fresh = tiny_config(run_dir.parent, cfg.data.cache_dir, steps=2)
    with pytest.raises(Exception, match="already has checkpoints"):
        train(fresh, progress=False)
    cfg.steps = 6
    assert train(cfg, resume="latest", progress=False).step == 6
    names = sorted(p.name for p in ckpt.checkpoints_dir(run_dir).iterdir())
    assert names == ["step_00000004", "step_00000006"]  # the backup was put back, then kept as keep_last=2


def test_metrics_of_the_final_evaluation_are_written_into_its_checkpoint(tmp_path, pristine):
    cfg = tiny_config(tmp_path, pristine.data.cache_dir, steps=2, checkpoint_interval=0)
    result = train(cfg, progress=False)
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["metrics"] == result.metrics and "zero_shot/top1" in state["metrics"]
    assert not [p for p in result.checkpoint.iterdir() if p.name.startswith(".tmp")]


def test_nan_weights_are_refused_by_eval_not_scored(run, capsys):
    run_dir, _ = run
    _nan_weights(_latest(run_dir))
    assert main(["eval", str(run_dir)]) == 2  # it scored R@1 100% before: every similarity tied
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite values" in err[0], err
