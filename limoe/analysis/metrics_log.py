"""Reading a training run's metrics log (`metrics.jsonl`: one JSON dict per logged step)."""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def find_metrics(checkpoint: str | os.PathLike) -> Path | None:
    """The run's metrics log next to a checkpoint: in the checkpoint folder, or beside/above a checkpoint file."""
    path = Path(checkpoint)
    for folder in ([path] if path.is_dir() else []) + [path.parent, path.parent.parent]:
        candidate = folder / METRICS_FILE
        if candidate.is_file():
            return candidate
    return None


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> tuple[list[dict], int]:
    """(rows that parse as JSON objects, number of lines skipped), only rows of `kind` ("train", "eval", "final")
    when given. A run killed mid-write leaves a torn last line; skipping it keeps every complete step usable."""
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(row, dict):
                if kind is None or row.get("kind", "train") == kind:  # a row without a kind is a step
                    rows.append(row)
            else:
                skipped += 1
    return rows, skipped
