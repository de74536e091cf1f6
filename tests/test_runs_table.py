"""scripts/runs_table.py: means, stds and paired differences of the runs' final records, computed by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("runs_table", Path(__file__).parents[1] / "scripts" / "runs_table.py")
runs_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs_table)


def _run(folder: Path, top1: float, loss: float, final: bool = True) -> str:
    folder.mkdir()
    rows = [{"kind": "train", "step": 1, "time": 100.0}, {"kind": "eval", "step": 2, "time": 130.0}]
    if final:
        rows.append({"kind": "final", "step": 2, "time": 160.0, "seen/top1": top1, "retrieval/contrastive_loss": loss})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    return str(folder)


def test_mean_std_and_paired_difference(tmp_path, capsys):
    a = [_run(tmp_path / f"a{i}", t, 4.0) for i, t in enumerate((0.30, 0.32, 0.34))]
    b = [_run(tmp_path / f"b{i}", t, 5.0) for i, t in enumerate((0.29, 0.30, 0.35))]
    runs_table.main([f"A={','.join(a)}", f"B={','.join(b)}", "--keys", "seen/top1,retrieval/contrastive_loss",
                     "--seconds"])
    lines = capsys.readouterr().out.splitlines()
    # 30/32/34 %: mean 32, std 2; losses are not scaled; each run spans 60 s. Paired A-B: 1, 2, -1 -> 0.67 ± 1.53.
    assert lines[2] == "| A | 32.00 ± 2.00 | 4.00 ± 0.00 | 60.00 ± 0.00 | 3 |"
    assert lines[3] == "| B | 31.33 ± 3.21 | 5.00 ± 0.00 | 60.00 ± 0.00 | 3 |"
    assert lines[4] == "| A − B, paired | 0.67 ± 1.53 | -1.00 ± 0.00 | 0.00 ± 0.00 | 3 |"


def test_an_unfinished_run_is_one_error_line(tmp_path):
    run = _run(tmp_path / "r", 0.3, 4.0, final=False)
    with pytest.raises(SystemExit, match="has no final record"):
        runs_table.main([f"A={run}"])


def test_train_keys_average_the_second_half_and_count_binding_steps(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    losses = [0.5, 0.0, 0.0, 0.2, 0.0, 0.1]  # steps 10..60; the second half is steps 40, 50, 60
    rows = [{"kind": "train", "step": 10 * (i + 1), "time": float(i), "g": v, "routing/routing_success/text": 0.9}
            for i, v in enumerate(losses)]
    rows.append({"kind": "final", "step": 60, "time": 9.0, "seen/top1": 0.3})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs_table.main([f"A={run}", "--keys", "seen/top1", "--train-keys", "g,g>0,routing/routing_success/text"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | seen/top1 | train:g | train:g>0 | train:routing/routing_success/text | seeds |"
    # mean of 0.2, 0, 0.1 = 0.1; positive at 2 of 3 steps = 66.67 %; routing success in %
    assert lines[2] == "| A | 30.00 | 0.10 | 66.67 | 90.00 | 1 |"
