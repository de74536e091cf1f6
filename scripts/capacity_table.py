"""How much evaluation drops cost: finished runs evaluated again at several MoE evaluation capacity factors, as one
markdown table of mean ± std over each group's seeds, then the first group's paired differences from each other
group (the same evaluation as `limoe eval --capacity-factor F`).

    python scripts/capacity_table.py "(c)=runs/c-s0,runs/c-s1" "(f)=runs/f-s0,runs/f-s1" --factors 1,2,8 \\
        [--cache capacity.json]

With E experts and top-1 routing, factor E gives every expert room for every token of its group: nothing drops.
Each (run, factor) evaluation is kept in --cache, so a rerun only evaluates what is new.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = (("seen/top1", "seen top-1 %", 100), ("zero_shot/top1", "held-out top-1 %", 100),
        ("retrieval/contrastive_loss", "held-out loss", 1))


def evaluate(run: str, factor: float, cache: dict) -> dict:
    from limoe.jobs import evaluate_checkpoint

    key = f"{Path(run).resolve()}@{factor:g}"
    if key not in cache:
        cache[key] = dict(evaluate_checkpoint(run, capacity_factor=factor))
    return cache[key]


def cell(values: list[float], scale: float) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.fmean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="+", metavar="LABEL=RUN,RUN,...")
    parser.add_argument("--factors", default="1,2,8", help="comma-separated capacity factors (default: 1,2,8)")
    parser.add_argument("--cache", help="JSON file keeping every evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    factors = [float(f) for f in args.factors.split(",")]
    cache_path = Path(args.cache) if args.cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    header = ["runs", "eval capacity factor", *(title for _, title, _ in KEYS), "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    measured: dict[tuple[str, float], list[dict]] = {}
    for group in args.groups:
        label, _, runs = group.partition("=")
        runs = [r for r in runs.split(",") if r]
        for factor in factors:
            measured[label, factor] = [evaluate(run, factor, cache) for run in runs]
            if cache_path:
                cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            cells = [cell([m[key] for m in measured[label, factor]], scale) for key, _, scale in KEYS]
            lines.append(f"| {label} | {factor:g} | " + " | ".join(cells) + f" | {len(runs)} |")
            print(lines[-1], file=sys.stderr, flush=True)
    # The first group minus each other, seed i against seed i (the groups list their runs in seed order).
    first, *others = dict.fromkeys(label for label, _ in measured)
    for label in others:
        for factor in factors:
            pairs = list(zip(measured[first, factor], measured[label, factor]))
            cells = [cell([a[key] - b[key] for a, b in pairs], scale) for key, _, scale in KEYS]
            lines.append(f"| {first} − {label}, paired | {factor:g} | " + " | ".join(cells) + f" | {len(pairs)} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
