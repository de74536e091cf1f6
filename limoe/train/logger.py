"""Metrics sinks of a run (rank 0 only): a JSONL file, optional TensorBoard, and the final results table."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append one JSON object per log event to <run_dir>/metrics.jsonl; mirror scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resumed_at: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:
            truncate_after(self.path, resumed_at)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:  # optional: TensorBoard is not a dependency of limoe
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                print("limoe: tensorboard=true but TensorBoard is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only")

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self.file.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop the records a resumed run replays: everything after `step`, and the final evaluation at `step`
    (resuming a finished run evaluates again). A line torn by a kill is dropped too."""
    if not path.exists():
        return
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            records.append((record, line))
    finished = any(r.get("kind") == "final" and r["step"] == step for r, _ in records)
    kept = [line for r, line in records if not (finished and r["step"] == step and r.get("kind") in ("eval", "final"))]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def results_table(metrics: dict[str, float], chance: dict[str, float] | None = None) -> str:
    """The end-of-run table: zero-shot, retrieval and routing health, with chance levels where known."""
    # The corpus's styles, each scored against every held-out class: the pooled top-1's chance is theirs too.
    styles = sorted(k for k in metrics if k.startswith("zero_shot/top1/"))
    chance = {**(chance or {}), **{k: (chance or {}).get("zero_shot/top1") for k in styles}}
    rows = [
        ("zero-shot top-1", "zero_shot/top1"), ("zero-shot top-5", "zero_shot/top5"),
        *((f"zero-shot top-1 {k.rsplit('/', 1)[1]}", k) for k in styles),
        ("retrieval image->text R@1", "retrieval/image_to_text/R@1"),
        ("retrieval text->image R@1", "retrieval/text_to_image/R@1"),
        ("routing success image", "train/routing_success/image"),
        ("routing success text", "train/routing_success/text"),
    ]
    lines = [f"{'metric':<28}{'value':>9}{'chance':>9}"]
    for label, key in rows:
        if key in metrics:
            c = chance.get(key)
            lines.append(f"{label:<28}{100 * metrics[key]:>8.2f}%" + (f"{100 * c:>8.2f}%" if c else f"{'':>9}"))
    return "\n".join(lines)


EVAL_COLUMNS = (("zero-shot top-1", "zero_shot/top1"), ("top-5", "zero_shot/top5"),
                ("image->text R@1", "retrieval/image_to_text/R@1"), ("text->image R@1", "retrieval/text_to_image/R@1"))


# What "best" means for a run's evaluations (the table's mark, checkpoints/best): zero-shot top-1 when the run
# measures it, else image->text R@1.
SELECTION_KEYS = ("zero_shot/top1", "retrieval/image_to_text/R@1")


def selection_score(metrics: dict[str, Any]) -> float | None:
    """The score that ranks a run's evaluations; None when `metrics` has none of SELECTION_KEYS."""
    for key in SELECTION_KEYS:
        if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key]):
            return float(metrics[key])
    return None


def evaluations_table(metrics_path: str | Path) -> str | None:
    """The held-out evaluations of a run, one row per step, the best marked (by zero-shot top-1, else
    image->text R@1); None when the run logged none. A long run's best is often not its last."""
    from limoe.analysis.metrics_log import read_metrics

    if not Path(metrics_path).is_file():
        return None
    rows, _ = read_metrics(metrics_path, kind="eval")
    columns = [(label, key) for label, key in EVAL_COLUMNS if any(key in r for r in rows)]
    if not columns:
        return None
    # The first row of the best score, as checkpoints/best keeps the first (a later tie does not replace it).
    best = max(rows, key=lambda r: -1.0 if selection_score(r) is None else selection_score(r))
    lines = [f"{'step':>8}" + "".join(f"{label:>17}" for label, _ in columns)]
    for r in rows:
        cells = "".join(f"{100 * r[key]:>16.2f}%" if isinstance(r.get(key), (int, float)) else f"{'-':>17}"
                        for _, key in columns)
        lines.append(f"{r['step']:>8}{cells}" + ("   <- best" if r is best else ""))
    return "\n".join(lines)
