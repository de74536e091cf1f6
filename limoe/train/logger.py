"""Metrics sinks of a run (rank 0 only): a JSONL file, optional TensorBoard, and the final results table."""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any


WANDB_ID_FILE = "wandb-id.txt"  # the run's W&B id: a resumed run logs on into the same W&B run


class MetricsLogger:
    """Append one JSON object per log event to <run_dir>/metrics.jsonl; mirror scalars to TensorBoard and to
    Weights & Biases (`wandb`: the project and the run's config, or None)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resumed_at: int | None = None,
                 ends_at: int | None = None, wandb: tuple[str, dict[str, Any]] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:  # ends_at: the resumed run's last step (its final evaluation is replayed there)
            truncate_after(self.path, resumed_at, ends_at)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:  # optional: TensorBoard is not a dependency of limoe
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                print("limoe: tensorboard=true but TensorBoard is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only")
        self.wandb = _start_wandb(Path(run_dir), *wandb) if wandb is not None else None

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self.file.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self.file.flush()
        scalars = {f"{kind}/{key}": value for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def require_wandb():
    from limoe.extras import require

    return require("wandb", "wandb", "logging to Weights & Biases (--set wandb=true)")


def _start_wandb(run_dir: Path, project: str, config: dict[str, Any]):
    """A W&B run named after the run folder, resumed when the folder has logged to one before. Offline mode
    (WANDB_MODE=offline) needs no account; W&B drops records of steps it has seen, so a resumed run's replayed
    steps stay in metrics.jsonl only."""
    wandb = require_wandb()
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else secrets.token_hex(6)
    id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", config=config,
                      dir=str(run_dir))


def truncate_after(path: Path, step: int, ends_at: int | None = None) -> None:
    """Drop the records a resumed run replays: everything after `step`, and the evaluation and final records at
    `step` when the resumed run ends there (`ends_at == step`: a finished run resumed as it was only evaluates
    again). A run resumed for more steps never evaluates `step` again: its records there are the only ones, the
    last evaluation of the earlier invocation, and stay (as `ends_at=None`, unknown, keeps them: a record
    repeated is better than one lost). A line torn by a kill is dropped too."""
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
    replayed = ends_at == step
    kept = [line for r, line in records if not (replayed and r["step"] == step and r.get("kind") in ("eval", "final"))]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def metric_row(label: str, key: str, value: float, chance: float | None = None, width: int = 28) -> str:
    """One row of a metrics table: a loss as a number (nats), a share as a percentage with its chance level."""
    if key.endswith("loss"):
        return f"{label:<{width}}{value:>9.3f}"
    return f"{label:<{width}}{100 * value:>8.2f}%" + (f"{100 * chance:>8.2f}%" if chance else "")


def results_table(metrics: dict[str, float], chance: dict[str, float] | None = None) -> str:
    """The end-of-run table: zero-shot (seen concepts in unseen renderings, then held-out concepts), the held-out
    contrastive loss, retrieval and routing health, with chance levels where known; then top-1 per style."""
    chance = chance or {}
    rows = [
        ("seen concepts top-1", "seen/top1"), ("seen concepts top-5", "seen/top5"),
        ("held-out concepts top-1", "zero_shot/top1"), ("held-out concepts top-5", "zero_shot/top5"),
        ("retrieval image->text R@1", "retrieval/image_to_text/R@1"),
        ("retrieval text->image R@1", "retrieval/text_to_image/R@1"),
        ("held-out contrastive loss", "retrieval/contrastive_loss"),
        ("routing success image", "train/routing_success/image"),
        ("routing success text", "train/routing_success/text"),
    ]
    lines = [f"{'metric':<28}{'value':>9}{'chance':>9}"]
    lines += [metric_row(label, key, metrics[key], chance.get(key)) for label, key in rows if key in metrics]
    # The corpus scores each style's images against all of a test's classes: the pooled top-1's chance is theirs.
    tests = [(label, prefix) for label, prefix in (("seen", "seen"), ("held-out", "zero_shot"))
             if any(k.startswith(f"{prefix}/top1/") for k in metrics)]
    styles = sorted({k.rsplit("/", 1)[1] for _, prefix in tests for k in metrics if k.startswith(f"{prefix}/top1/")})
    if styles:
        lines += ["", f"{'top-1 by style':<28}" + "".join(f"{label:>10}" for label, _ in tests)]
        for style in styles:
            cells = (metrics.get(f"{prefix}/top1/{style}") for _, prefix in tests)
            lines.append(f"{style:<28}" + "".join(f"{100 * v:>9.2f}%" if v is not None else f"{'-':>10}"
                                                  for v in cells))
    return "\n".join(lines)


EVAL_COLUMNS = (("seen top-1", "seen/top1"), ("held-out top-1", "zero_shot/top1"), ("top-5", "zero_shot/top5"),
                ("image->text R@1", "retrieval/image_to_text/R@1"), ("text->image R@1", "retrieval/text_to_image/R@1"))


# What "best" means for a run's evaluations (the table's mark, checkpoints/best): the first of these the run
# measures: seen concepts in unseen renderings (the corpus), held-out concepts, image->text R@1.
SELECTION_KEYS = ("seen/top1", "zero_shot/top1", "retrieval/image_to_text/R@1")


def selection_score(metrics: dict[str, Any]) -> float | None:
    """The score that ranks a run's evaluations; None when `metrics` has none of SELECTION_KEYS."""
    for key in SELECTION_KEYS:
        if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key]):
            return float(metrics[key])
    return None


def evaluations_table(metrics_path: str | Path) -> str | None:
    """The held-out evaluations of a run, one row per step, the best marked (by the first of SELECTION_KEYS it
    has); None when the run logged none. A long run's best is often not its last."""
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
