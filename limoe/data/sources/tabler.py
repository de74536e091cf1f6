"""Tabler Icons from the PyPI package `pytablericons`: 24 px stroke icons (outline; also rendered at the light
and bold stroke weights, sources.STROKE_WEIGHTS) and a filled subset.

Each outline SVG starts with a comment holding its category and tags (`tags: [love, emotion, like]`); a
filled icon has the metadata of the outline icon of the same name. Brand logos (`brand-*`) are left out, as in
every source: they are trademarks named after companies, not after what they show.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from limoe.data.sources import Item, phrase, stroke_weights, words
from limoe.extras import locate

NAME = "tabler"
LICENSE = "MIT"
STYLES = {"outline": "line", "filled": "solid"}


def _root() -> Path:
    return locate("pytablericons", "data", "the corpus's Tabler icons") / "icons"


def version() -> str:
    return metadata.version("pytablericons")


def attribution() -> str:
    licence = metadata.distribution("pytablericons").read_text("LICENSE") or ""
    return ("Tabler Icons (https://tabler.io/icons), via the Python package pytablericons. License: MIT.\n\n"
            + licence.strip())


def header(svg: str) -> dict[str, object]:
    """The metadata comment at the top of a Tabler SVG: {'category': 'Shapes', 'tags': ['love', ...]}."""
    match = re.match(r"\s*<!--(.*?)-->", svg, re.S)
    out: dict[str, object] = {}
    for line in (match.group(1).splitlines() if match else []):
        key, _, value = line.partition(":")
        value = value.strip()
        if key.strip() == "tags" and value.startswith("["):
            out["tags"] = [phrase(t.strip(" \"'")) for t in value.strip("[]").split(",") if t.strip(" \"'")]
        elif key.strip() == "category" and value:
            out["category"] = value.strip("\"'")
    return out


def items() -> list[Item]:
    root = _root()
    meta = {p.stem: header(p.read_text(encoding="utf-8")) for p in sorted((root / "outline").glob("*.svg"))}
    found = []
    for folder, style in STYLES.items():
        for path in sorted((root / folder).glob("*.svg")):
            if path.stem.startswith("brand-"):
                continue
            m = meta.get(path.stem) or header(path.read_text(encoding="utf-8"))
            category = phrase(str(m["category"])) if m.get("category") else None
            item = Item(NAME, style, path.stem, words(path.stem), tags=tuple(m.get("tags", ())),
                        categories=(category,) if category else (), svg_path=str(path))
            found += stroke_weights(item) if style == "line" else [item]
    return found
