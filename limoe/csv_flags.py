"""open_clip's CSV flags (`--csv-img-key`, `--csv-caption-key`, `--csv-separator`) on `train`, `eval` and
`analyze`: each sets the run config's `data.csv_*` key of the same name, which every CSV the command reads uses."""

from __future__ import annotations

import argparse

FLAGS = (("--csv-img-key", "csv_img_key", "column of the image paths (default: filepath, or the run's)"),
         ("--csv-caption-key", "csv_caption_key", "column of the captions (default: title, or the run's)"),
         ("--csv-separator", "csv_separator", "one character, or tab / comma / semicolon / pipe (default: tab for "
                                              ".tsv files, else comma, or the run's)"))


def _separator(text: str) -> str:
    from limoe.data.csv_dataset import parse_separator  # here: building the parsers must not import torch

    try:
        return parse_separator(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_csv_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CSV files (open_clip's flags; same as --set data.csv_*)")
    for flag, key, help_text in FLAGS:
        group.add_argument(flag, dest=key, help=help_text, type=_separator if key == "csv_separator" else None)


def csv_flag_values(args: argparse.Namespace) -> dict[str, str]:
    """The flags that were given, by their data.csv_* key."""
    return {key: getattr(args, key) for _, key, _ in FLAGS if getattr(args, key, None) is not None}


def apply_csv_flags(args: argparse.Namespace, data) -> None:
    """Set the flags that were given on `data` (a DataConfig)."""
    for key, value in csv_flag_values(args).items():
        setattr(data, key, value)
