"""`limoe reproduce`: argument parsing for the reproduction (see limoe.reproduce)."""

from __future__ import annotations

import argparse
import signal
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_reproduce_parser(subparsers) -> argparse.ArgumentParser:
    from limoe.reproduce import STUDY_NAMES
    from limoe.reproduce.plan import SCALES, VARIANT_NAMES

    scales = "; ".join(f"{name}: {scale.description}" for name, scale in SCALES.items())
    p = subparsers.add_parser(
        "reproduce", help="LIMoE vs dense vs two-tower and the aux-loss / BPR ablation on the built-in data",
        description="Train the paper's comparison on the built-in data at matched compute and write results.md, "
                    f"results.json and plots. Finished runs are kept and skipped when rerun. Scales: {scales}.")
    p.add_argument("--study", default="paper", choices=list(STUDY_NAMES),
                   help="paper: the paper's comparison and ablation (default); scaling: dense vs LIMoE at several "
                        "sizes and training lengths, paired seeds, against training FLOPs; ablations: one factor of "
                        "the full recipe at a time (capacity, noise, expert init, entropy weights and threshold); "
                        "upcycling: dense N steps then upcycled to LIMoE for N more, against dense and LIMoE "
                        "trained 2N (written beside the scaling study's runs: upcycling.md)")
    p.add_argument("--scale", default="cpu", choices=list(SCALES),
                   help="smoke, cpu or gpu (default: cpu; each is described above)")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/reproduce-<scale>; upcycling: runs/scaling-<scale>; the "
                        "other studies: runs/<study>-<scale>)")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds (default: the scale's)")
    p.add_argument("--variants", type=_names, help=f"comma-separated subset of {', '.join(VARIANT_NAMES)}")
    p.add_argument("--parallel", type=int, help="runs at once, one CPU thread each (default: the scale's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every run, e.g. moe.num_experts=16 (repeatable; as in train)")
    p.add_argument("--no-sweep", action="store_true", help="skip the accuracy-vs-compute model sizes")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write results.md, results.json and plots from the finished runs (also "
                        "while another invocation trains the rest)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    p.set_defaults(func=run_reproduce)
    return p


def run_reproduce(args: argparse.Namespace) -> int:
    from limoe.errors import UserError
    from limoe.reproduce import reproduce

    if args.parallel is not None and args.parallel < 1:
        print(f"limoe: error: --parallel must be >= 1, got {args.parallel}", file=sys.stderr)
        return 2
    try:
        # The upcycling study adds its runs to the scaling study's, whose dense and LIMoE runs it compares with.
        study_folder = {"paper": "reproduce", "upcycling": "scaling"}.get(args.study, args.study)
        default_out = f"runs/{study_folder}-{args.scale}"
        summary = reproduce(args.scale, args.out or default_out, seeds=args.seeds, variants=args.variants,
                            parallel=args.parallel, device=args.device, overrides=tuple(args.set),
                            sweep=not args.no_sweep, study=args.study, report_only=args.report_only)
    except (UserError, ValueError) as e:
        print(f"limoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or Stopped: a signal the runs stopped for
        print(f"limoe: interrupted{f' ({e})' if str(e) else ''}; the same command continues where this stopped",
              file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    return 1 if summary["failed"] else 0
