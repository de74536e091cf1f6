"""The `limoe` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from limoe.demo import run_demo

    return run_demo(tokens=args.tokens, steps=args.steps, seed=args.seed)


def _data(args: argparse.Namespace) -> int:
    from limoe.data import BuiltinConfig, build_builtin_dataset

    cfg = BuiltinConfig(raster_size=args.size, test_fraction=args.test_fraction)
    if args.action == "build":
        print(build_builtin_dataset(cfg, force=args.force))
    elif args.action == "info":
        print((build_builtin_dataset(cfg) / "manifest.json").read_text())
    else:  # style
        from limoe.data.styles import build_style

        if not (args.images and args.name):
            raise SystemExit("limoe data style: needs --images DIR and --name NAME")
        print(build_style(args.images, args.name, cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="limoe",
        description="LIMoE: one sparse Mixture-of-Experts transformer for images and text.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="route two-modality tokens through a MoE layer and report routing health")
    demo.add_argument("--tokens", type=int, default=2048, help="tokens per step (default: 2048)")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    data = sub.add_parser("data", help="build or inspect the built-in OpenMoji image-text dataset")
    data.add_argument("action", choices=["build", "info", "style"],
                      help="build: build now (else built on first use); info: print its manifest; "
                           "style: add another codepoint-named emoji set from --images")
    data.add_argument("--size", type=int, default=64, help="render size in pixels (default: 64)")
    data.add_argument("--test-fraction", type=float, default=0.2, help="share of concepts held out (default: 0.2)")
    data.add_argument("--force", action="store_true", help="rebuild even if cached")
    data.add_argument("--images", help="style: folder of images named by codepoints")
    data.add_argument("--name", help="style: name of the style")
    data.set_defaults(func=_data)

    from limoe.analysis.cli import add_analyze_parser

    add_analyze_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
