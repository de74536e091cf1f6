"""CSV/TSV of (image path, caption) — open_clip's `--csv-img-key` / `--csv-caption-key` convention."""

from __future__ import annotations

import csv
import os
from typing import Iterator

import torch

from limoe.data.stream import Record, SampleStream, deal_indices, read_file


class CsvPairs(SampleStream):
    """Image-text pairs listed in a CSV (or TSV) file; yields (image [3,S,S], caption str).

    Only the index (paths + captions, a few bytes per row) is held in memory; images are read lazily in
    the worker that owns them. Relative image paths are resolved against `root` (default: the CSV's folder).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str | None = None,
        root: str | os.PathLike | None = None,
        **stream_kwargs,
    ):
        path = os.fspath(path)
        super().__init__(name=path, **stream_kwargs)
        if sep is None:
            sep = "\t" if path.endswith((".tsv", ".tsv.txt")) else ","
        root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CSV file not found: {path}")
        # surrogateescape keeps a file with one non-UTF-8 caption readable; that caption is then
        # counted as "bad_encoding" instead of failing the whole index.
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
                if key not in columns:
                    raise KeyError(f"{path}: no column {key!r} ({flag}); columns are {columns}")
            rows = [(r[img_key] or "", r[caption_key] or "") for r in reader]
        self.paths = [p if os.path.isabs(p) else os.path.join(root, p) for p, _ in rows]
        self.captions = [c for _, c in rows]

    def __len__(self) -> int:
        """Rows in the index (bad rows included: they are only known once read)."""
        return len(self.paths)

    def records(self, part: int, parts: int, gen: torch.Generator | None) -> Iterator[Record]:
        for i in deal_indices(len(self.paths), part, parts, gen, self.drop_uneven):
            yield Record(key=str(i), image=read_file(self.paths[i]), target=self.captions[i])


def write_csv(path: str | os.PathLike, rows: list[tuple[str, str]], img_key: str = "filepath",
              caption_key: str = "title", sep: str | None = None) -> None:
    """Write (image path, caption) rows in the format CsvPairs reads."""
    path = os.fspath(path)
    if sep is None:
        sep = "\t" if path.endswith(".tsv") else ","
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow([img_key, caption_key])
        w.writerows(rows)
