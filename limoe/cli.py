"""The `limoe` command line: one sub-command per job.

Every user mistake (a UserError from any module, a missing file) is one line `limoe: error: ...` and exit 2;
an interruption is exit 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from limoe.errors import UserError


def _demo(args: argparse.Namespace) -> int:
    from limoe.demo import run_demo

    return run_demo(tokens=args.tokens, steps=args.steps, seed=args.seed)


def _data(args: argparse.Namespace) -> int:
    if (args.dataset or ("builtin" if args.action == "style" else "corpus")) == "corpus":
        return _corpus(args)
    from limoe.data import BuiltinConfig, build_builtin_dataset

    fraction = 0.2 if args.test_fraction is None else args.test_fraction
    cfg = BuiltinConfig(raster_size=args.size, test_fraction=fraction, max_concepts=args.max_concepts)
    if args.action == "build":
        print(build_builtin_dataset(cfg, force=args.force))
    elif args.action == "info":
        folder = build_builtin_dataset(cfg)
        print(f"built-in dataset: {folder}")
        print((folder / "manifest.json").read_text())
    else:  # style
        from limoe.data.styles import build_style

        if not (args.images and args.name):
            raise UserError("limoe data style needs --images DIR and --name NAME")
        print(build_style(args.images, args.name, cfg))
    return 0


def _export(args: argparse.Namespace) -> int:
    from limoe import checkpoint as ckpt
    from limoe.checkpoint_sharded import export, is_sharded

    path = ckpt.resolve(args.checkpoint)
    if not is_sharded(path):
        raise UserError(f"{path} is a single-folder checkpoint already: copy it")
    print(export(path, args.out))
    return 0


def _corpus(args: argparse.Namespace) -> int:
    import json

    from limoe.data.corpus import CorpusConfig, build_corpus
    from limoe.data.corpus.info import pairs_table

    cfg = CorpusConfig(raster_size=args.size, max_concepts=args.max_concepts)
    if args.test_fraction is not None:
        cfg.test_fraction = args.test_fraction
    if args.action == "style":
        raise UserError("limoe data style adds emoji sets to the built-in dataset, not to the corpus")
    folder = build_corpus(cfg, force=args.force)
    if args.action == "build":
        print(folder)
    else:
        print(f"corpus: {folder}\n")
        print(pairs_table(json.loads((folder / "manifest.json").read_text(encoding="utf-8"))))
    return 0


def fail(message: str) -> int:
    print(f"limoe: error: {message}", file=sys.stderr)
    return 2


def _print_evaluations(run_dir) -> None:
    from pathlib import Path

    from limoe.train.logger import evaluations_table

    table = evaluations_table(Path(run_dir) / "metrics.jsonl")
    if table:
        print(f"\nHeld-out evaluations during training ({Path(run_dir) / 'metrics.jsonl'}):")
        print(table)


def _read_config(path: str):
    import json

    from limoe.train import ConfigError, load_config

    try:
        return load_config(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable config ({e})") from None


def _train(args: argparse.Namespace) -> int:
    from limoe import checkpoint as ckpt
    from limoe.train import apply_overrides, get_preset, train

    try:  # user errors are one line via main(); only an interruption needs a word of its own
        if args.config:
            cfg = _read_config(args.config)
        elif args.resume:  # continue with the run's own config; --steps / --set may still change it
            path = ckpt.resolve(args.resume, args.run_dir)
            cfg = _read_config(str(path / "config.json"))
            cfg.run_dir = args.run_dir or ("" if args.fork else str(ckpt.run_dir_of(path)))
        else:
            cfg = get_preset(args.preset)
        if args.model:
            cfg.model = args.model
        for value, key in ((args.steps, "steps"), (args.seed, "seed"), (args.run_dir, "run_dir"),
                           (args.device, "device")):
            if value is not None:
                setattr(cfg, key, value)
        apply_overrides(cfg, args.set or [])
        cfg.validate()
        result = train(cfg, resume=args.resume, progress=not args.no_progress, fork=args.fork)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("\nlimoe: interrupted: stopped without saving", file=sys.stderr)
        return 130
    if result.interrupted:
        return 130 if result.interrupted == "SIGINT" else 143
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if result.metrics:
        print(f"\nResults after {result.step} steps of {cfg.model} (held-out concepts; routing over the last "
              f"{cfg.log_interval} training steps):")
        print(result.table())
    _print_evaluations(cfg.run_dir)
    if result.skipped:
        print(f"skipped samples: {', '.join(f'{n} {reason}' for reason, n in result.skipped.items())} "
              f"(data/skipped/* in metrics.jsonl)")
    print(f"run directory: {cfg.run_dir}  (metrics.jsonl, config.json, checkpoints/)")
    print(f"checkpoint: {result.checkpoint} (step {result.step})")
    best = ckpt.checkpoints_dir(cfg.run_dir) / ckpt.BEST
    if ckpt.best_metrics(cfg.run_dir) is not None:
        print(f"best: {best} (step {ckpt.read_json(best / 'state.json').get('step', '?')}, the best held-out "
              f"evaluation)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from limoe import checkpoint as ckpt
    from limoe.jobs import evaluate_checkpoint, metrics_table

    path = ckpt.resolve(args.checkpoint)
    step = ckpt.read_json(path / "state.json").get("step", "?")
    metrics = evaluate_checkpoint(str(path), args.zero_shot, args.class_names, args.templates, args.retrieval,
                                  args.probe_train, args.probe_test, args.shots, args.batch_size, args.device)
    print(f"checkpoint: {path} (step {step})")
    print(metrics_table(metrics))
    _print_evaluations(ckpt.run_dir_of(path))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(f"wrote {args.output}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    from limoe.jobs import classify

    results = classify(args.checkpoint, args.images, args.labels, top=args.top, device=args.device)
    for r in results:  # in the order given; an unreadable image is an error line among the predictions
        if "error" in r:
            fail(r["error"])
        else:
            print(f"{r['image']}: " + ", ".join(f"{label} {100 * p:.1f}%" for label, p in r["labels"]), flush=True)
    return 2 if any("error" in r for r in results) else 0


def _embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from limoe.jobs import embed

    texts = list(args.text or [])
    if args.texts_file:
        if not Path(args.texts_file).is_file():
            return fail(f"texts file not found: {args.texts_file}")
        texts += [t for t in Path(args.texts_file).read_text(encoding="utf-8").splitlines() if t.strip()]
    path, shape = embed(args.checkpoint, args.output, images=args.images or [], texts=texts, device=args.device)
    print(f"wrote {path}: {shape[0]} embeddings of dimension {shape[1]}")
    return 0


def _add_job_parsers(sub) -> None:
    train = sub.add_parser("train", help="train (default: a tiny LIMoE on the built-in data, CPU) and evaluate",
                           description="Train a contrastive model, evaluate it on held-out data and print results. "
                                       "With no arguments: the default tiny LIMoE on the built-in OpenMoji data.")
    train.add_argument("--preset", default="default", help="named training preset: default, quick, limoe-b16")
    train.add_argument("--config", help="a config.json of an earlier run (instead of a preset)")
    train.add_argument("--model", help="model preset, e.g. limoe-tiny, dense-tiny, limoe-b16")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. optim.lr=1e-3, moe.capacity_factor=1.25, "
                            "model.width=96, data.batch_size=64 (repeatable)")
    train.add_argument("--steps", type=int, help="optimizer steps (same as --set steps=N)")
    train.add_argument("--seed", type=int, help="seed of the weights, data order and augmentation (same as --set "
                                                "seed=N)")
    train.add_argument("--run-dir", help="run directory (config, metrics.jsonl, checkpoints)")
    train.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    train.add_argument("--resume", help="'latest' (of the run directory) or a checkpoint path")
    train.add_argument("--fork", action="store_true",
                       help="allow --resume from another run's checkpoint or with a changed model config "
                            "(continues it in --run-dir, default a new folder)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="zero-shot, retrieval and k-shot linear probe of a checkpoint")
    ev.add_argument("checkpoint", help="checkpoint folder (checkpoints/step_N) or run folder (its latest checkpoint)")
    ev.add_argument("--zero-shot", metavar="DIR", help="image folder, one sub-folder per class "
                                                       "(default: the held-out concepts of the run's built-in "
                                                       "data or corpus)")
    ev.add_argument("--class-names", help="class-name file (default: DIR/classnames.txt or folder names)")
    ev.add_argument("--templates", help="prompt template file (default: DIR/templates.txt or built-in)")
    ev.add_argument("--retrieval", metavar="CSV", help="image-text pairs CSV (default: the test split of the "
                                                      "run's built-in data or corpus)")
    ev.add_argument("--probe-train", metavar="DIR", help="image folder to pick the k shots per class from")
    ev.add_argument("--probe-test", metavar="DIR", help="image folder to test the linear probe on")
    ev.add_argument("--shots", type=int, default=10)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--output", "-o", help="write the metrics as JSON here")
    ev.set_defaults(func=_eval)

    checkpoint_help = "checkpoint folder (checkpoints/step_N) or run folder (its latest checkpoint)"
    cl = sub.add_parser("classify", help="zero-shot labels for your own images")
    cl.add_argument("checkpoint", help=checkpoint_help)
    cl.add_argument("images", nargs="+", metavar="IMAGE")
    cl.add_argument("--labels", required=True, help='comma-separated labels ("cat,dog") or @file, one per line')
    cl.add_argument("--top", type=int, default=3, help="labels shown per image, most probable first (default: 3)")
    cl.add_argument("--device", default="cpu")
    cl.set_defaults(func=_classify)

    em = sub.add_parser("embed", help="image or text embeddings to .npy / .safetensors")
    em.add_argument("checkpoint", help=checkpoint_help)
    em.add_argument("--images", nargs="+", metavar="IMAGE")
    em.add_argument("--text", nargs="+", action="extend", metavar="TEXT",
                    help="texts to embed: --text 'a cat' 'a dog' (repeatable)")
    em.add_argument("--texts-file", help="a file with one text per line")
    em.add_argument("--output", "-o", required=True, help="output .npy or .safetensors")
    em.add_argument("--device", default="cpu")
    em.set_defaults(func=_embed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="limoe",
        description="LIMoE: one sparse Mixture-of-Experts transformer for images and text.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_job_parsers(sub)

    from limoe.analysis.cli import add_analyze_parser

    add_analyze_parser(sub)

    from limoe.reproduce.cli import add_reproduce_parser

    add_reproduce_parser(sub)

    from limoe.train.sizing import add_memory_parser

    add_memory_parser(sub)

    data = sub.add_parser("data", help="build or inspect the built-in image-text datasets (OpenMoji; the corpus)")
    data.add_argument("action", choices=["build", "info", "style"],
                      help="build: build now (else built on first use); info: print its manifest (the corpus: "
                           "pairs per source, style and split); style: add another codepoint-named emoji set "
                           "from --images to the built-in dataset")
    data.add_argument("--dataset", choices=["builtin", "corpus"], default=None,
                      help="corpus: emoji and icons in four styles, the default run's data (default; style: "
                           "builtin); builtin: OpenMoji colour emoji")
    data.add_argument("--size", type=int, default=64, help="render size in pixels (default: 64)")
    data.add_argument("--test-fraction", type=float, default=None,
                      help="share of concepts held out (default: 0.2 builtin, 0.15 corpus)")
    data.add_argument("--max-concepts", type=int, default=None, help="a small subset of concepts (quick builds)")
    data.add_argument("--force", action="store_true", help="rebuild even if cached")
    data.add_argument("--images", help="style: folder of images named by codepoints")
    data.add_argument("--name", help="style: name of the style")
    data.set_defaults(func=_data)

    export = sub.add_parser("export", help="write a sharded (FSDP) checkpoint as a single-folder one "
                                           "(model.safetensors), e.g. to share it")
    export.add_argument("checkpoint", help="a sharded checkpoint folder")
    export.add_argument("out", help="the new checkpoint folder (must not exist)")
    export.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="route two-modality tokens through a MoE layer and report routing health")
    demo.add_argument("--tokens", type=int, default=2048, help="tokens per step (default: 2048)")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UserError as e:
        return fail(str(e))
    except FileNotFoundError as e:
        return fail(f"not found: {e.filename}" if e.filename else str(e))
    except KeyboardInterrupt:
        print("\nlimoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
