"""scripts/capacity_table.py: evaluations at several capacity factors, their means and paired differences by hand,
and the cache that keeps a rerun from evaluating again."""

import importlib.util
import sys
from pathlib import Path


_spec = importlib.util.spec_from_file_location("capacity_table",
                                               Path(__file__).parents[1] / "scripts" / "capacity_table.py")
capacity_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capacity_table)


def test_means_paired_differences_and_cache(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_evaluate(run, capacity_factor):
        calls.append((Path(run).name, capacity_factor))
        seen = {"a0": 0.30, "a1": 0.32, "b0": 0.20, "b1": 0.26}[Path(run).name] + capacity_factor / 100
        return {"seen/top1": seen, "zero_shot/top1": 0.1, "retrieval/contrastive_loss": 4.0 + capacity_factor}

    monkeypatch.setattr("limoe.jobs.evaluate_checkpoint", fake_evaluate)
    args = ["A=runs/a0,runs/a1", "B=runs/b0,runs/b1", "--factors", "1,8", "--cache", str(tmp_path / "c.json")]
    monkeypatch.setattr(sys, "argv", ["capacity_table.py", *args])
    capacity_table.main()
    lines = capsys.readouterr().out.splitlines()
    # A at factor 1: 31 and 33 % -> 32.00 ± 1.41; A − B paired at 8: 10 and 6 points -> 8.00 ± 2.83
    assert lines[2] == "| A | 1 | 32.00 ± 1.41 | 10.00 ± 0.00 | 5.00 ± 0.00 | 2 |"
    assert lines[-1] == "| A − B, paired | 8 | 8.00 ± 2.83 | 0.00 ± 0.00 | 0.00 ± 0.00 | 2 |"
    assert len(calls) == 8
    capacity_table.main()  # everything is in the cache now
    assert len(calls) == 8 and capsys.readouterr().out.splitlines() == lines
