"""Classification image folders for zero-shot evaluation: `root/<class folder>/<image>` per sample.

Optional text files beside the data:
- class names: one line per class, either `folder<TAB>name` or, in sorted-folder order, just `name`
  (folder names such as `n01440764` or `thumbs_up` are rarely what the text tower should read);
- prompt templates: one template per line containing `{}` (or CLIP_benchmark's `{c}`), e.g. `a photo of a {}.`.
Instead of a file, a built-in benchmark's name (`limoe.data.benchmarks`): class names `cifar10`, `cifar100` (for
folders named by class index or by class name), templates `simple`, `openai`, `openai-cifar`.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Iterator

import torch

from limoe.data import benchmarks
from limoe.data.stats import DataError, DataNotFoundError
from limoe.evaluate import is_template
from limoe.data.stream import Record, SampleStream, deal_indices, read_file

DEFAULT_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "{}")


def read_lines(path: str | os.PathLike) -> list[str]:
    if not os.path.isfile(path):
        raise DataNotFoundError(f"{os.fspath(path)}: file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first name
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _builtin(path: str | os.PathLike, table: dict, what: str) -> tuple | None:
    """The built-in list `path` names, if it is no file; a path that is neither is a one-line error."""
    name = os.fspath(path)
    if os.path.isfile(name):
        return None
    if benchmarks.is_named(name, table):
        return table[name.lower()]
    raise DataNotFoundError(f"{name}: no such {what} file, and no built-in one of that name "
                            f"({', '.join(sorted(table))})")


def class_names_by_index(path: str | os.PathLike) -> list[str]:
    """Class names in class-index order (shards label by index): a built-in benchmark's, or a file's lines."""
    builtin = _builtin(path, benchmarks.CLASS_NAMES, "class-names")
    return list(builtin) if builtin is not None else [line.strip() for line in read_lines(path)]


def read_class_names(path: str | os.PathLike, folders: list[str]) -> list[str]:
    """Class display names in the order of `folders` (see module docstring for the layouts)."""
    builtin = _builtin(path, benchmarks.CLASS_NAMES, "class-names")
    if builtin is not None:
        return benchmarks.names_for_folders(builtin, folders, os.fspath(path))
    lines = read_lines(path)
    if all("\t" in line for line in lines):
        mapping = dict(line.split("\t", 1) for line in lines)
        unknown = [d for d in folders if d not in mapping]
        if unknown:
            raise DataError(f"{path}: no class name for folders {unknown[:5]}; add a folder<TAB>name line for each")
        return [mapping[d].strip() for d in folders]
    if len(lines) != len(folders):
        raise DataError(f"{path}: {len(lines)} class names for {len(folders)} class folders; one line per folder")
    return [line.strip() for line in lines]


def read_templates(path: str | os.PathLike) -> list[str]:
    builtin = _builtin(path, benchmarks.TEMPLATES, "templates")
    if builtin is not None:
        return list(builtin)
    templates = [line.replace("{c}", "{}") for line in read_lines(path)]
    bad = [t for t in templates if not is_template(t)]
    if bad or not templates:
        raise DataError(f"{path}: every prompt template needs exactly one '{{}}' for the class name (other braces "
                        f"doubled); bad: {bad[:3]}")
    return templates


class ImageFolder(SampleStream):
    """Yields (image [3,S,S], class index); `class_names[i]` and `templates` are for the text tower."""

    target_kind = "label"

    def __init__(self, root: str | os.PathLike, class_names_file: str | os.PathLike | None = None,
                 templates_file: str | os.PathLike | None = None, **stream_kwargs):
        root = os.fspath(root)
        super().__init__(name=root, **stream_kwargs)
        if not os.path.isdir(root):
            raise DataNotFoundError(f"image folder not found: {root}")
        self.folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.folders:
            raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
        self.class_names = (read_class_names(class_names_file, self.folders) if class_names_file
                            else [d.replace("_", " ") for d in self.folders])
        self.templates = list(read_templates(templates_file) if templates_file else DEFAULT_TEMPLATES)
        self.paths: list[str] = []
        self.labels: list[int] = []
        for label, d in enumerate(self.folders):
            for name in sorted(os.listdir(os.path.join(root, d))):
                # Any regular file is listed (a mislabelled or broken file is counted when read);
                # hidden files such as .DS_Store are not data.
                path = os.path.join(root, d, name)
                if not name.startswith(".") and os.path.isfile(path):
                    self.paths.append(path)
                    self.labels.append(label)

    def __len__(self) -> int:
        return len(self.paths)

    def records(self, part: int, parts: int, gen: torch.Generator | None) -> Iterator[Record]:
        for i in deal_indices(len(self.paths), part, parts, gen, self.drop_uneven):
            yield Record(key=self.paths[i], image=read_file(self.paths[i]), target=self.labels[i])

    def decode_target(self, raw: int) -> int:
        return raw

    def where(self, keep: Callable[[str], bool]) -> "ImageFolder":
        """The images whose path `keep` accepts, with the same classes and templates (labels keep their
        meaning, so a subset is scored against every class)."""
        subset = copy.copy(self)
        rows = [(p, y) for p, y in zip(self.paths, self.labels) if keep(p)]
        subset.paths, subset.labels = [p for p, _ in rows], [y for _, y in rows]
        return subset
