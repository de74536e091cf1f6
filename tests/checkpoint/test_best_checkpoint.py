"""checkpoints/best: the step of the best held-out evaluation, kept through pruning, resume and a killed swap.

Held-out scores are scripted (the loop's evaluation is replaced), so which step is best is known in advance.
"""

import os

import pytest
import torch

import limoe
from limoe import checkpoint as ckpt
from limoe.cli import main
from limoe.train import loop, train
from limoe.train.logger import evaluations_table

from _train_utils import tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin")


def scripted(monkeypatch, scores: list[float]) -> list[float]:
    """The loop's evaluations report these zero-shot top-1 scores, in order; returns those reported so far."""
    made = []

    def held_out(model, tokenizer, zero_shot_set, retrieval_set, batch_size):
        made.append(scores[len(made)])
        return {"zero_shot/top1": made[-1], "zero_shot/top5": 1.0}, {"zero_shot/top1": 0.1}

    monkeypatch.setattr(loop, "held_out", held_out)
    return made


def best_step(run_dir) -> int:
    return ckpt.read_json(ckpt.checkpoints_dir(run_dir) / ckpt.BEST / "state.json")["step"]


def test_best_survives_pruning_and_is_a_loadable_checkpoint(tmp_path, cache, monkeypatch):
    evaluated = scripted(monkeypatch, [0.3, 0.5, 0.5, 0.4])  # at steps 2, 4, 6 and 8
    cfg = tiny_config(tmp_path, cache, steps=8, checkpoint_interval=0, keep_last=1)
    cfg.eval.interval = 2
    straight = train(cfg, progress=False)
    run = tmp_path / "run"
    assert len(evaluated) == 4
    # Step 4 is best (6 only ties); keep_last=1 has deleted its step folder, not the best copy.
    assert best_step(run) == 4 and [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000008"]
    assert ckpt.best_metrics(run)["zero_shot/top1"] == 0.5 and straight.best == ckpt.checkpoints_dir(run) / "best"
    assert "   <- best" in [line for line in evaluations_table(run / "metrics.jsonl").splitlines()
                           if line.split()[0] == "4"][0]
    model, _, _ = limoe.load_checkpoint(str(ckpt.checkpoints_dir(run) / ckpt.BEST))
    last, _, _ = limoe.load_checkpoint(str(run))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values()))
    # Best-only saves change nothing in training: the same run without evaluations has the same losses.
    monkeypatch.undo()
    plain = tiny_config(tmp_path / "plain", cache, steps=8, checkpoint_interval=0)
    plain.eval.interval = 0
    plain.eval.zero_shot = plain.eval.retrieval = False
    assert train(plain, progress=False).losses == pytest.approx(straight.losses, abs=1e-6, rel=0)


def test_resume_keeps_the_best_so_far(tmp_path, cache, monkeypatch):
    scripted(monkeypatch, [0.5, 0.2])
    cfg = tiny_config(tmp_path, cache, steps=8, checkpoint_interval=0)
    cfg.eval.interval = 2
    train(cfg, stop_after=4, progress=False)
    run = tmp_path / "run"
    assert best_step(run) == 2  # step 4 was worse
    scripted(monkeypatch, [0.45])
    monkeypatch.setattr(ckpt, "mark_best", lambda *a: pytest.fail("0.45 at step 6 is no new best"))
    train(cfg, resume="latest", stop_after=2, progress=False)  # the resumed run knows step 2's 0.5
    monkeypatch.undo()
    scripted(monkeypatch, [0.6])
    assert train(cfg, resume="latest", progress=False).best is not None and best_step(run) == 8


def test_a_swap_killed_between_its_renames_is_restored(tmp_path, cache, monkeypatch):
    scripted(monkeypatch, [0.5, 0.1])
    cfg = tiny_config(tmp_path, cache, steps=4, checkpoint_interval=0)
    cfg.eval.interval = 2
    train(cfg, progress=False)
    root = ckpt.checkpoints_dir(tmp_path / "run")
    os.replace(root / ckpt.BEST, root / f"{ckpt.BACKUP_PREFIX}{ckpt.BEST}")  # as a kill after the first rename
    assert ckpt.best_metrics(tmp_path / "run")["zero_shot/top1"] == 0.5 and best_step(tmp_path / "run") == 2


def test_train_command_names_the_best_checkpoint(tmp_path, cache, monkeypatch, capsys):
    scripted(monkeypatch, [0.5, 0.1])
    monkeypatch.setenv("LIMOE_CACHE", str(cache))
    args = ["train", "--preset", "quick", "--steps", "4", "--seed", "3", "--run-dir", str(tmp_path / "run"),
            "--no-progress",
            "--set", "eval.interval=2", "--set", "data.batch_size=16", "--set", "data.max_concepts=40",
            "--set", "data.vocab_size=512"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"best: {tmp_path / 'run' / 'checkpoints' / 'best'} (step 2" in out
    assert ckpt.read_json(tmp_path / "run" / "config.json")["seed"] == 3
    assert main(["eval", str(tmp_path / "run" / "checkpoints" / "best")]) == 0
    assert "(step 2)" in capsys.readouterr().out
