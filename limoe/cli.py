"""The `limoe` command line: one sub-command per job.

Every user mistake (a UserError from any module, a missing file) is one line `limoe: error: ...` and exit 2;
an interruption is one line and exit 130 (Ctrl-C) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from limoe.errors import Terminated, UserError


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
        import json

        folder = build_builtin_dataset(cfg)
        print(f"built-in dataset: {folder}\n")
        print(builtin_table(json.loads((folder / "manifest.json").read_text(encoding="utf-8"))))
    else:  # style
        from limoe.data.styles import build_style

        if not (args.images and args.name):
            raise UserError("limoe data style needs --images DIR and --name NAME")
        print(build_style(args.images, args.name, cfg))
    return 0


def builtin_table(manifest: dict) -> str:
    """The built-in OpenMoji set's manifest as the corpus's info prints its own: counts per split, then where the
    images come from and how they were built."""
    splits = list(manifest.get("pairs", {}))
    lines = [f"{'':<10}" + "".join(f"{s:>9}" for s in splits)]
    for row in ("pairs", "concepts"):
        lines.append(f"{row:<10}" + "".join(f"{manifest.get(row, {}).get(s, '-'):>9}" for s in splits))
    config = manifest.get("config", {})
    lines += ["", f"source: {manifest.get('source', '?')} ({manifest.get('license', '?')}), colour emoji only",
              f"images: {config.get('raster_size', '?')} px; held-out share of concepts: "
              f"{config.get('test_fraction', '?')}; concepts: {config.get('max_concepts') or 'all'}",
              f"build: {manifest.get('build_seconds', '?')} s"]
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    from limoe import checkpoint as ckpt
    from limoe.checkpoint.sharded import export
    from limoe.outputs import check_output_folder

    check_output_folder(args.out, "export to", new=True)
    path = ckpt.resolve(args.checkpoint)
    if not ckpt.is_sharded(path):
        raise UserError(f"{path} is a single-folder checkpoint already: copy it")
    out = export(path, args.out)
    print(f"exported {path} (step {ckpt.step_of(path)}) as a single-folder checkpoint: {out}")
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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    from limoe.csv_flags import apply_csv_flags
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
                           (args.device, "device"), (args.init_from, "init_from")):
            if value is not None:
                setattr(cfg, key, value)
        apply_overrides(cfg, args.set or [])
        apply_csv_flags(args, cfg.data)
        cfg.validate()
        result = train(cfg, resume=args.resume, progress=not args.no_progress, fork=args.fork)
    except KeyboardInterrupt as e:  # a second Ctrl-C, or a signal before training started
        print(f"\nlimoe: {_stopped_by(e)}: stopped without saving", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    if result.interrupted:
        return 130 if result.interrupted == "SIGINT" else 143
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if result.metrics:
        print(f"\nResults after {result.step} steps of {cfg.model} ({results_scope(result.metrics, cfg)}):")
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


def results_scope(metrics: dict[str, float], cfg) -> str:
    """What the end-of-run table measured: which evaluation ran, and the routing window (MoE models only)."""
    parts = []
    if any(k.startswith(("seen/", "zero_shot/", "retrieval/")) for k in metrics):
        zero_shot = cfg.eval.zero_shot_dir or ("the held-out data" if cfg.data.source in ("builtin", "corpus")
                                               else None)
        parts.append(f"evaluated on {zero_shot or cfg.eval.retrieval_csv}")
    else:
        parts.append("nothing evaluated: no held-out data configured")
    if any(k.startswith("train/routing_success/") for k in metrics):
        parts.append(f"routing over the last {cfg.log_interval} training steps")
    return "; ".join(parts)


def _eval(args: argparse.Namespace) -> int:
    import json

    from limoe import checkpoint as ckpt
    from limoe.csv_flags import csv_flag_values
    from limoe.jobs import evaluate_checkpoint, evaluation_plan, metrics_table, run_config
    from limoe.outputs import check_output_file

    path = ckpt.resolve(args.checkpoint)
    if args.output:
        check_output_file(args.output)
    plan = evaluation_plan(run_config(str(path)), args.zero_shot, args.retrieval, args.probe_train, args.probe_test,
                           args.shots)
    # Up front: the evaluation takes a while, and what it scores is worth knowing before the numbers come.
    print(f"{_checkpoint_line(path)}: evaluating {plan}", flush=True)
    metrics = evaluate_checkpoint(str(path), args.zero_shot, args.class_names, args.templates, args.retrieval,
                                  args.probe_train, args.probe_test, args.shots, args.batch_size, args.device,
                                  progress=_progress("eval"), capacity_factor=args.capacity_factor,
                                  csv=csv_flag_values(args))
    print(metrics_table(metrics))
    _print_evaluations(ckpt.run_dir_of(path))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(f"wrote {args.output}")
    return 0


def _checkpoint_line(path) -> str:
    """"checkpoint: PATH (step N)", the way every command names the checkpoint it used."""
    from limoe import checkpoint as ckpt

    step = ckpt.step_of(path)
    return f"checkpoint: {path} (step {'?' if step is None else step})"


def _progress(command: str):
    """Progress lines of a long job, on stderr: stdout keeps only the results."""
    return lambda line: print(f"limoe {command}: {line}", file=sys.stderr, flush=True)


def _classify(args: argparse.Namespace) -> int:
    from limoe import checkpoint as ckpt
    from limoe.jobs import classify

    path = ckpt.resolve(args.checkpoint)  # a run folder means its latest checkpoint: say which one answered
    results = classify(str(path), args.images, args.labels, top=args.top, device=args.device)
    print(_checkpoint_line(path), flush=True)
    for r in results:  # in the order given; an unreadable image is an error line among the predictions
        if "error" in r:
            fail(r["error"])
        else:
            print(f"{r['image']}: " + ", ".join(f"{label} {100 * p:.1f}%" for label, p in r["labels"]), flush=True)
    return 2 if any("error" in r for r in results) else 0


def _embed(args: argparse.Namespace) -> int:
    from limoe import checkpoint as ckpt
    from limoe.jobs import embed, inputs_path, read_texts
    from limoe.outputs import check_output_file

    check_output_file(args.output)
    texts = list(args.text or []) + (read_texts(args.texts_file) if args.texts_file else [])
    checkpoint = ckpt.resolve(args.checkpoint)
    path, shape = embed(str(checkpoint), args.output, images=args.images or [], texts=texts, device=args.device)
    kind = "image" if args.images else "text"
    where = inputs_path(path) if path.endswith(".npy") else "its metadata ('items')"
    print(_checkpoint_line(checkpoint))
    print(f"wrote {path}: {shape[0]} {kind} embeddings of dimension {shape[1]}, L2-normalised (unit length: a dot "
          f"product is the cosine similarity); row i is input i, the inputs listed in {where}")
    return 0


def _add_job_parsers(sub) -> None:
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_classify_and_embed_parsers(sub)


def _add_train_parser(sub) -> None:
    from limoe.csv_flags import add_csv_flags

    train = sub.add_parser("train", help="train (default: a tiny LIMoE on the built-in corpus, CPU) and evaluate",
                           description="Train a contrastive model, evaluate it on held-out data and print results. "
                                       "With no arguments: the default tiny LIMoE on the built-in corpus of emoji "
                                       "and icons.")
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
    train.add_argument("--init-from", metavar="DENSE_RUN",
                       help="sparse upcycling: start from a dense one-tower run or checkpoint of the same shape, "
                            "each expert a copy of its block's MLP, routers fresh, its tokenizer (same as --set "
                            "init_from=...)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_csv_flags(train)
    train.set_defaults(func=_train)


def _add_eval_parser(sub) -> None:
    from limoe.csv_flags import add_csv_flags

    ev = sub.add_parser("eval", help="zero-shot, retrieval and k-shot linear probe of a checkpoint",
                        description="Evaluate a checkpoint. By default on the held-out data of the built-in corpus or "
                                    "OpenMoji set the run trained on; a run trained on your own data (data.source "
                                    "csv or wds) needs --zero-shot and/or --retrieval. The first line names the "
                                    "checkpoint and the data, progress goes to stderr.")
    ev.add_argument("checkpoint", help="checkpoint folder (checkpoints/step_N) or run folder (its latest checkpoint)")
    ev.add_argument("--zero-shot", metavar="DIR", help="image folder, one sub-folder per class, or webdataset "
                                                       "shards in CLIP_benchmark's layout ('test/{0..9}.tar': "
                                                       "image + .cls per sample) (default: the held-out concepts "
                                                       "of the run's built-in data or corpus)")
    ev.add_argument("--class-names", metavar="FILE|cifar10|cifar100",
                    help="class-name file or built-in list (default: classnames.txt beside the data, or the "
                         "folder names)")
    ev.add_argument("--templates", metavar="FILE|simple|openai|openai-cifar",
                    help="prompt template file or built-in set (default: templates.txt or "
                         "zeroshot_classification_templates.txt beside the data, or built-in)")
    ev.add_argument("--retrieval", metavar="CSV", help="image-text pairs CSV (default: the test split of the "
                                                      "run's built-in data or corpus)")
    ev.add_argument("--probe-train", metavar="DIR", help="image folder to pick the k shots per class from")
    ev.add_argument("--probe-test", metavar="DIR", help="image folder to test the linear probe on")
    ev.add_argument("--shots", type=positive_int, default=10,
                    help="labelled images per class the linear probe learns from (default: 10)")
    ev.add_argument("--batch-size", type=positive_int, default=256,
                    help="images or pairs per forward pass (default: 256)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    ev.add_argument("--capacity-factor", type=positive_float, metavar="F",
                    help="evaluate every MoE layer with capacity factor F: how many tokens it may drop "
                         "(default: the model's moe.eval_capacity_factor; E or more drops nothing)")
    ev.add_argument("--output", "-o", help="write the metrics as JSON here")
    add_csv_flags(ev)
    ev.set_defaults(func=_eval)


def _add_classify_and_embed_parsers(sub) -> None:
    checkpoint_help = "checkpoint folder (checkpoints/step_N) or run folder (its latest checkpoint)"
    cl = sub.add_parser("classify", help="zero-shot labels for your own images")
    cl.add_argument("checkpoint", help=checkpoint_help)
    cl.add_argument("images", nargs="+", metavar="IMAGE", help="image files to label (any format PIL reads)")
    cl.add_argument("--labels", required=True, help='comma-separated labels ("cat,dog") or @file, one per line')
    cl.add_argument("--top", type=positive_int, default=3,
                    help="labels shown per image, most probable first (default: 3)")
    cl.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    cl.set_defaults(func=_classify)

    em = sub.add_parser("embed", help="L2-normalised image or text embeddings to .npy / .safetensors",
                        description="Embed images or texts with a checkpoint: an [N, D] float32 array of L2-normalised "
                                    "embeddings (unit length, so a dot product is the cosine similarity), row i for "
                                    "input i in the order given. The inputs go with it: in a .safetensors file's "
                                    "metadata ('kind', 'items'), or for .npy in OUT.inputs.json beside it.")
    em.add_argument("checkpoint", help=checkpoint_help)
    em.add_argument("--images", nargs="+", metavar="IMAGE", help="image files to embed, one row each")
    em.add_argument("--text", nargs="+", action="extend", metavar="TEXT",
                    help="texts to embed: --text 'a cat' 'a dog' (repeatable); an empty text is refused")
    em.add_argument("--texts-file", help="a UTF-8 file with one text per line (after any --text); a blank line is "
                                         "refused with its line number, blank lines at the end are ignored")
    em.add_argument("--output", "-o", required=True, help="output .npy or .safetensors")
    em.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
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
                           "pairs per source, style and split: train, held-out concepts, seen concepts); style: add "
                           "another codepoint-named emoji set from --images to the built-in dataset")
    data.add_argument("--dataset", choices=["builtin", "corpus"], default=None,
                      help="corpus: emoji and icons in eleven styles, the default run's data (default; style: "
                           "builtin); builtin: OpenMoji colour emoji")
    data.add_argument("--size", type=int, default=64, help="render size in pixels (default: 64)")
    data.add_argument("--test-fraction", type=float, default=None,
                      help="share of concepts held out (default: 0.2 builtin, 0.1 corpus)")
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
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the toy tokens, the layers' initial weights and the router noise (default: 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # SIGTERM (a scheduler, `kill`) gets a line and exit 143 in every phase; training replaces this handler with
    # its own, which saves a checkpoint first.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return args.func(args)
    except UserError as e:
        return fail(str(e))
    except FileNotFoundError as e:
        return fail(f"not found: {e.filename}" if e.filename else str(e))
    except OSError as e:  # a full disk or a permission found only while writing: the path and the reason
        return fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except KeyboardInterrupt as e:
        print(f"\nlimoe: {_stopped_by(e)}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    raise Terminated


def _stopped_by(e: KeyboardInterrupt) -> str:
    return "SIGTERM received" if isinstance(e, Terminated) else "interrupted"


if __name__ == "__main__":
    sys.exit(main())
