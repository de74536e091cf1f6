"""CSV/TSV of (image path, caption) — open_clip's `--csv-img-key` / `--csv-caption-key` convention."""

from __future__ import annotations

import contextlib
import csv
import os
import warnings
from typing import Iterator

import torch

from limoe.data.stats import DataError, DataNotFoundError, MissingColumnError
from limoe.data.stream import Record, SampleStream, deal_indices, read_file


@contextlib.contextmanager
def no_field_limit():
    """csv refuses fields over 131,072 characters by default; a long caption is data (the tokenizer
    truncates it), not a reason to stop. The limit is process-wide, so it is restored afterwards."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # the largest value every platform's C long accepts
    try:
        yield
    finally:
        csv.field_size_limit(old)


class _Lines:
    """A file's lines for csv.reader, numbered, keeping the lines of the row being read so that all but its first
    can be read again: a row that ran on past an unclosed quote swallowed rows of their own."""

    def __init__(self, f):
        self.f = f
        self.read = 0  # lines read from the file
        self.row: list[tuple[int, str]] = []  # (line number, line) of the row being read
        self.again: list[tuple[int, str]] = []  # lines to hand out again, the next one last

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.again:
            number, line = self.again.pop()
        else:
            line = next(self.f)
            self.read += 1
            number = self.read
        self.row.append((number, line))
        return line

    def reread_after_first(self) -> None:
        self.again.extend(reversed(self.row[1:]))


def read_rows(f, sep: str, path: str) -> tuple[list[str], list[list[str] | None]]:
    """(header, rows) of a CSV/TSV; a row with broken quoting is None (counted as 'bad_row' when read).

    strict quoting makes a stray quote an error for that row alone (the reader resumes at the next line)
    instead of silently merging fields. A quote never closed would swallow the following lines into that bad row,
    up to the next quote or the end of the file: the row alone is bad, reading goes on with the line after its
    first, and a warning names the file and the line. Blank lines are not rows.
    """
    lines = _Lines(f)
    reader = csv.reader(lines, delimiter=sep, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}: unreadable header row ({e}); is it a {'TSV' if sep == chr(9) else 'CSV'} file?")
    if not header:
        raise DataError(f"{path}: empty file, no header row (expected columns such as filepath,title)")
    rows: list[list[str] | None] = []
    while True:
        lines.row = []
        try:
            row = next(reader)
        except StopIteration:
            return header, rows
        except csv.Error as e:
            rows.append(None)
            if len(lines.row) > 1:  # a quoted field ran on past its own line, over rows of their own
                start = lines.row[0][0]
                until = "the end of the file" if "unexpected end of data" in str(e) else f"line {lines.row[-1][0]}"
                warnings.warn(f"{path}: line {start}: a quoted field opened on this line runs on to {until} (a quote "
                              f"never closed?); that row is skipped (bad_row) and reading goes on at line "
                              f"{start + 1}", stacklevel=3)
                lines.reread_after_first()
            continue
        if row:
            rows.append(row)


# Named separators for the command line, where a tab is awkward to type; any other single character is itself.
SEPARATOR_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
_LIKELY_SEPARATORS = (",", "\t", ";", "|")


def parse_separator(text: str | None) -> str | None:
    """A CSV separator from a flag or config value: one character, or tab / \\t / comma / semicolon / pipe;
    None stays None (then the file's extension decides). Anything else is a ValueError."""
    if text is None:
        return None
    sep = SEPARATOR_NAMES.get(text.lower(), text)
    if len(sep) != 1 or sep in "\"\r\n":
        raise ValueError(f"a CSV separator is one character (or tab, comma, semicolon, pipe), got {text!r}")
    return sep


def separator_problem(text: str | None) -> str | None:
    """DataConfig's check of data.csv_separator."""
    try:
        parse_separator(text)
    except ValueError as e:
        return str(e)
    return None


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
        sep: str | None = None,  # one character, or tab / comma / semicolon / pipe; None: by extension
        root: str | os.PathLike | None = None,
        **stream_kwargs,
    ):
        path = os.fspath(path)
        super().__init__(name=path, **stream_kwargs)
        sep = parse_separator(sep)
        if sep is None:
            sep = "\t" if path.endswith((".tsv", ".tsv.txt")) else ","
        root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(path):
            raise DataNotFoundError(f"CSV file not found: {path}")
        # surrogateescape keeps a file with one non-UTF-8 caption readable; that caption is then
        # counted as "bad_encoding" instead of failing the whole index. utf-8-sig drops a BOM (spreadsheet
        # exports write one) that would otherwise become part of the first column's name.
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f, no_field_limit():
            columns, rows = read_rows(f, sep, path)
        for key, flag, what in ((img_key, "img", "image paths"), (caption_key, "caption", "captions")):
            if key not in columns:
                others = [c for c in _LIKELY_SEPARATORS if c != sep and len(columns) == 1 and c in columns[0]]
                name = {"\t": "tab"}.get(others[0], others[0]) if others else ""
                hint = f" (separated by {others[0]!r}? pass --csv-separator {name!r})" if others else ""
                raise MissingColumnError(f"{path}: no column {key!r}; columns are {columns}{hint}; name the "
                                         f"column of the {what} with --csv-{flag}-key (data.csv_{flag}_key)")
        i_img, i_cap = columns.index(img_key), columns.index(caption_key)
        # A row with too few or too many fields stays in the index with caption None: every pass then counts
        # it as 'bad_row' (a shifted column would otherwise pair an image with the wrong caption).
        good = [r if r is not None and len(r) == len(columns) else None for r in rows]
        self.paths = ["" if r is None else r[i_img] if os.path.isabs(r[i_img]) else os.path.join(root, r[i_img])
                      for r in good]
        self.captions: list[str | None] = [None if r is None else r[i_cap] for r in good]

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
