"""Seeds of several runs as one markdown table: each group's final metrics as mean ± std, and each group's paired
difference from the first group (seed i against seed i), so that a gap can be read against the seed spread.

    python scripts/runs_table.py "LIMoE=runs/limoe-s0,runs/limoe-s1,runs/limoe-s2" \\
        "dense=runs/dense-s0,runs/dense-s1,runs/dense-s2" [--keys seen/top1,zero_shot/top1] [--seconds]

A run is a `limoe train` run folder; its metrics are the `final` record of its metrics.jsonl (a run that has not
finished is one error line). Percent metrics (top-k, R@k, routing success) print x100.

`--train-keys` adds columns from the training records of the run's second half: the mean of a key, or, written
`KEY>0`, the share (%) of those steps where it is positive (e.g. whether a thresholded loss binds):

    python scripts/runs_table.py "(f)=runs/f-s0,runs/f-s1" \
        --train-keys "routing/router_entropy/text,aux/global_entropy/text>0"
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from limoe.analysis.metrics_log import METRICS_FILE, read_metrics  # noqa: E402

DEFAULT_KEYS = ("seen/top1", "zero_shot/top1", "zero_shot/top5", "retrieval/image_to_text/R@1",
                "retrieval/contrastive_loss")


def final_metrics(run: str) -> dict:
    rows, _ = read_metrics(Path(run) / METRICS_FILE, kind="final")
    if not rows:
        raise SystemExit(f"runs_table: error: {run} has no final record (not finished?)")
    return rows[-1]


def run_seconds(run: str) -> float:
    """Wall clock from the first to the last record of the run (training, evaluations, final evaluation)."""
    rows, _ = read_metrics(Path(run) / METRICS_FILE)
    times = [r["time"] for r in rows if "time" in r]
    return max(times) - min(times)


def train_means(run: str, keys: list[str]) -> dict[str, float]:
    """Per `keys` entry: the mean over the logged training steps of the second half (`KEY>0`: the share of them
    where KEY is positive); a key no record holds is left out."""
    rows, _ = read_metrics(Path(run) / METRICS_FILE, kind="train")
    last = max((r["step"] for r in rows), default=0)
    rows = [r for r in rows if r["step"] > last / 2]
    out = {}
    for key in keys:
        name, positive, _ = key.partition(">0")
        values = [r[name] for r in rows if isinstance(r.get(name), (int, float))]
        if values:
            out[f"train:{key}"] = statistics.fmean(v > 0 for v in values) if positive else statistics.fmean(values)
    return out


def _scale(key: str) -> float:
    if key.startswith("train:"):
        return 100.0 if key.endswith(">0") or "routing_success" in key else 1.0
    return 1.0 if key.endswith("loss") or key == "seconds" else 100.0


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(groups: dict[str, list[dict]], keys: list[str]) -> str:
    lines = ["| run | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for label, runs in groups.items():
        cells = [_mean_std([_scale(k) * r[k] for r in runs]) if all(k in r for r in runs) else "-" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} |")
    (base_label, base), *others = groups.items()
    for label, runs in others:
        pairs = list(zip(base, runs))
        cells = [_mean_std([_scale(k) * (a[k] - b[k]) for a, b in pairs])
                 if all(k in a and k in b for a, b in pairs) else "-" for k in keys]
        lines.append(f"| {base_label} − {label}, paired | " + " | ".join(cells) + f" | {len(pairs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", metavar="LABEL=RUN[,RUN...]", help="a row: its label and run folders")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated metrics of the final record")
    parser.add_argument("--seconds", action="store_true", help="add each run's wall-clock seconds as a column")
    parser.add_argument("--train-keys", default="",
                        help="comma-separated keys of the training records, averaged over the second half "
                             "(KEY>0: the share of its steps where KEY is positive)")
    args = parser.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k]
    train_keys = [k for k in args.train_keys.split(",") if k]
    groups = {}
    for group in args.groups:
        label, sep, runs = group.partition("=")
        if not sep or not runs:
            parser.error(f"{group!r}: expected LABEL=RUN[,RUN...]")
        groups[label] = [{**final_metrics(r), **train_means(r, train_keys), "seconds": run_seconds(r)}
                         for r in runs.split(",")]
    print(table(groups, keys + [f"train:{k}" for k in train_keys] + (["seconds"] if args.seconds else [])))


if __name__ == "__main__":
    main()
