"""metrics.jsonl on resume: the records a resumed run replays go, the final evaluation of a finished run that is
resumed for more steps stays (nothing evaluates that step again)."""

import json

from limoe.train import train
from limoe.train.logger import truncate_after

from _train_utils import tiny_config


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st')  # torn last line


def _records(path):
    return [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


FINISHED = [{"kind": "train", "step": 2}, {"kind": "eval", "step": 2}, {"kind": "train", "step": 4},
            {"kind": "eval", "step": 4}, {"kind": "final", "step": 4}]


def test_a_finished_run_resumed_for_more_steps_keeps_its_final_evaluation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, FINISHED)
    truncate_after(path, 4, ends_at=8)
    assert _records(path) == [(r["kind"], r["step"]) for r in FINISHED]
    _write(path, FINISHED)
    truncate_after(path, 4)  # the resumed run's length unknown: keep (a repeated record beats a lost one)
    assert _records(path) == [(r["kind"], r["step"]) for r in FINISHED]


def test_a_finished_run_resumed_as_it_was_evaluates_again_and_keeps_that_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, FINISHED)
    truncate_after(path, 4, ends_at=4)
    assert _records(path) == [("train", 2), ("eval", 2), ("train", 4)]


def test_resuming_an_earlier_checkpoint_drops_what_it_replays(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, FINISHED)
    truncate_after(path, 2, ends_at=4)
    assert _records(path) == [("train", 2), ("eval", 2)]  # the evaluation at 2 is not replayed: it stays


def _steps(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == kind]


def test_resuming_a_finished_run_keeps_its_final_evaluation(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, checkpoint_interval=0)
    train(cfg, progress=False)
    train(cfg, resume="latest", progress=False)  # as it was: evaluates step 2 again
    assert _steps(tmp_path / "run", "final") == [2] and _steps(tmp_path / "run", "eval") == [2]
    cfg.steps = 4
    train(cfg, resume="latest", progress=False)
    assert _steps(tmp_path / "run", "final") == [2, 4] and _steps(tmp_path / "run", "eval") == [2, 4]
