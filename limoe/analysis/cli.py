"""`limoe analyze CHECKPOINT`: the routing analysis of a trained model as an HTML report (or JSON for scripts).

`add_analyze_parser(subparsers)` adds it to the main parser; the handler imports torch, the checkpoint loader and
matplotlib only when it runs, so `limoe --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from limoe.csv_flags import add_csv_flags, apply_csv_flags
from limoe.errors import UserError


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze", help="routing analysis of a checkpoint: expert specialisation, routing success, expert maps",
        description="Run a checkpoint over a sample of image-text pairs and write an HTML report (index.html, PNG "
                    "plots, report.json) of its routing: image/text share per expert, routing success per "
                    "modality, expert usage, token-to-expert maps, and curves over training from the run's "
                    "metrics.jsonl.")
    p.add_argument("checkpoint", help="checkpoint folder (checkpoints/step_N), a file in one, or a run folder (its "
                                      "latest checkpoint)")
    p.add_argument("--data", default="held-out",
                   help="pairs to analyse: 'held-out' (the test split of the data the run trained on: corpus or "
                        "built-in), 'corpus', 'corpus:train', 'builtin' (built-in test split), 'builtin:train', a "
                        "CSV/TSV file (filepath,title columns) or webdataset shards ('data/{000..009}.tar'); "
                        "default: held-out")
    p.add_argument("--out", help="report folder (default: analysis/ in the run folder)")
    p.add_argument("--layer", type=int, default=None,
                   help="MoE layer (0-based among MoE layers; negative counts from the end) for the token maps "
                        "(default: the last one images pass through)")
    p.add_argument("--num-pairs", type=int, default=256, help="pairs to read (default: 256)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="pairs per forward pass; the model's routing groups (moe.group_size) split it (default: 32)")
    p.add_argument("--train-routing", action="store_true",
                   help="route as in training (train capacity factor, router noise) instead of eval")
    p.add_argument("--separate-passes", action="store_true",
                   help="encode images and texts in passes of their own, as inference does, instead of pairs as "
                        "training does (where a joint-routing model groups a pair's patches and text tokens)")
    p.add_argument("--metrics", help="metrics.jsonl of the run (default: the one next to the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sample's shuffle (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON of every number to stdout (the report is then written only with --out)")
    add_csv_flags(p)
    p.set_defaults(func=run_analyze)
    return p


def load_pairs(spec: str, image_size: int, seed: int = 0, run_config=None):
    """(image, caption) pairs for a --data value, as eval-time (unaugmented) images of the model's size;
    'held-out' needs the run's TrainConfig."""
    from limoe.data import CsvPairs, ImageConfig, WdsPairs, load_builtin

    image = ImageConfig(image_size=image_size)
    stream = dict(image=image, train=False, shuffle=True, seed=seed)
    if spec == "held-out":
        from limoe.train.data import held_out_pairs

        if run_config is None or run_config.data.source not in ("builtin", "corpus"):
            raise UserError("--data held-out needs a run trained on the corpus or the built-in data; pass "
                            "--data with a CSV file or shards of your own pairs")
        return held_out_pairs(run_config, **stream)
    if spec in ("builtin", "builtin:test", "builtin:train", "corpus", "corpus:test", "corpus:train"):
        split = "train" if spec.endswith(":train") else "test"
        if spec.startswith("corpus"):
            from limoe.data.corpus import load_corpus

            return load_corpus(split, **stream)
        return load_builtin(split, **stream)
    if ".tar" in spec:
        return WdsPairs(spec, image=image, train=False, shuffle=True, seed=seed)
    if Path(spec).suffix.lower() in (".csv", ".tsv", ".txt"):
        d = run_config.data if run_config is not None else None
        columns = (d.csv_img_key, d.csv_caption_key, d.csv_separator) if d is not None else ()
        return CsvPairs(spec, *columns, image=image, train=False, shuffle=True, seed=seed)
    raise UserError(f"--data must be held-out, corpus, corpus:train, builtin, builtin:train, a .csv/.tsv file or "
                    f".tar shards, got {spec!r}")


def describe_data(spec: str, pairs, run_config=None) -> str:
    """The pairs a --data value stands for, in words, with the file they come from where there is one."""
    split = "training" if spec.endswith(":train") else "test"
    if spec == "held-out":
        built_in = "corpus" if run_config.data.source == "corpus" else "built-in OpenMoji set"
        words = f"held-out pairs (the test split of the run's {built_in})"
    elif spec.startswith("corpus"):
        words = f"the built-in corpus's {split} split"
    elif spec.startswith("builtin"):
        words = f"the built-in OpenMoji set's {split} split"
    else:
        return spec
    name = getattr(pairs, "name", None)
    return f"{words}, {name}" if name else words


def run_analyze(args: argparse.Namespace) -> int:
    import torch

    import limoe
    from limoe.analysis.metrics_log import find_metrics
    from limoe.analysis.report import write_report
    from limoe.analysis.routing_stats import AnalysisConfig, analyze_routing

    from limoe import checkpoint as ckpt
    from limoe.outputs import check_output_folder

    checkpoint = ckpt.resolve(args.checkpoint)  # a run folder: its latest, named as such below
    out = args.out or (None if args.json else checkpoint / "analysis")
    if out is not None:  # before the analysis, which takes a while
        check_output_folder(out)
    model, tokenizer, run_config = limoe.load_checkpoint(checkpoint)
    apply_csv_flags(args, run_config.data)  # --data pairs.csv: its columns (default: the run's)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    pairs = load_pairs(args.data, model.config.image_size, args.seed, run_config)
    cfg = AnalysisConfig(num_pairs=args.num_pairs, batch_size=args.batch_size, train_routing=args.train_routing,
                         pairs=not args.separate_passes)
    analysis = analyze_routing(model, tokenizer, pairs, cfg)
    if args.layer is not None and analysis.layers and not -len(analysis.layers) <= args.layer < len(analysis.layers):
        raise UserError(f"--layer must be in [-{len(analysis.layers)}, {len(analysis.layers)}), got {args.layer}")

    metrics = args.metrics or find_metrics(checkpoint)
    source = {"checkpoint": str(checkpoint), "step": ckpt.step_of(checkpoint),
              "data": describe_data(args.data, pairs, run_config), "sample_seed": args.seed}
    if out is not None:
        index = write_report(analysis, out, metrics_path=metrics, layer=args.layer if analysis.layers else None,
                             source=source)
        print(f"limoe analyze: report written to {index}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        data = {"source": source, **analysis.to_json()}
        data["metrics_path"] = str(metrics) if metrics else None
        print(json.dumps(data))
    return 0
