"""A zero-shot classification set from one argument (`limoe eval --zero-shot`, `eval.zero_shot_dir`): an image
folder (`root/<class>/<image>`) or webdataset shards in CLIP_benchmark's layout (`<key>.<image>` + `<key>.cls`,
`classnames.txt` and `zeroshot_classification_templates.txt` beside the shards or one folder up).

Class names and templates: the files given (or a built-in benchmark's name: `limoe.data.benchmarks`), else the
files found beside the data, else the folder names and the default templates; shards need class names.
"""

from __future__ import annotations

import os
from pathlib import Path

from limoe.data.image_folder import DEFAULT_TEMPLATES, ImageFolder, class_names_by_index, read_templates
from limoe.data.stats import DataError
from limoe.data.wds import WdsLabels, expand_shards

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")
NAMES_FILES = ("classnames.txt",)
TEMPLATE_FILES = ("zeroshot_classification_templates.txt", "templates.txt")


def is_shard_pattern(source: str) -> bool:
    """Shards, not a folder: a tar name, a brace range or open_clip's `::` list."""
    return source.endswith(SHARD_SUFFIXES) or "::" in source or ("{" in source and not os.path.isdir(source))


def _beside(folders: list[Path], names: tuple[str, ...]) -> str | None:
    return next((str(f / n) for f in folders for n in names if (f / n).is_file()), None)


def zero_shot_set(source: str | os.PathLike, class_names: str | None = None, templates: str | None = None,
                  **stream_kwargs) -> ImageFolder | WdsLabels:
    """The set, with `.class_names` (index order) and `.templates`; `stream_kwargs` as SampleStream's."""
    source = os.fspath(source)
    if not is_shard_pattern(source):
        root = Path(source)
        return ImageFolder(root, class_names or _beside([root], NAMES_FILES),
                           templates or _beside([root], TEMPLATE_FILES), **stream_kwargs)
    first = Path(expand_shards(source)[0]).parent
    folders = [first, first.parent]
    names_file = class_names or _beside(folders, NAMES_FILES)
    if names_file is None:
        raise DataError(f"{source}: shards label images by class index, so they need class names: pass "
                        f"--class-names FILE|cifar10|cifar100, or put classnames.txt beside the shards")
    names = class_names_by_index(names_file)
    templates_file = templates or _beside(folders, TEMPLATE_FILES)
    ds = WdsLabels(source, len(names), **stream_kwargs)
    ds.class_names = names
    ds.templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    return ds
