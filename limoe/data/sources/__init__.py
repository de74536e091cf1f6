"""Image sources of the corpus: installed packages of SVG artwork, each listed as captioned items.

Every source is a module with `NAME`, `LICENSE`, `attribution()`, `version()` and `items()`; an item is one
SVG in one visual style with its name and the extra words the package ships for it (aliases, tags,
categories). Nothing is downloaded: the SVGs and their metadata are files of the installed packages.

    openmoji     OpenMoji emoji (CC BY-SA 4.0): styles color, line (the outline layer alone), flat (the
                 colour layer alone)
    tabler       Tabler Icons (MIT): line (outline), solid (filled)
    fontawesome  Font Awesome Free (icons CC BY 4.0): solid, line (the "regular" outline set); the brand
                 logos are left out (trademarks, named after companies rather than what they show)
    lucide       Lucide (ISC): line
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOURCE_NAMES = ("openmoji", "tabler", "fontawesome", "lucide")
STYLES = ("color", "flat", "line", "solid")


@dataclass(frozen=True)
class Item:
    source: str                       # one of SOURCE_NAMES
    style: str                        # one of STYLES
    key: str                          # unique within (source, style); the file stem of its render
    name: str                         # primary caption, e.g. "arrow big left", "thumbs up, medium skin tone"
    aliases: tuple[str, ...] = ()     # other names of the same thing (captions on their own)
    tags: tuple[str, ...] = ()        # keywords (captions only next to the name)
    categories: tuple[str, ...] = ()  # e.g. "shapes", "animal mammal"
    codepoints: tuple[int, ...] = ()  # the emoji this item shows (OpenMoji) or stands for (Font Awesome)
    svg_path: str | None = None       # the SVG file, or
    svg_text: str | None = None       # its markup (sources that ship SVGs inside a database)
    css: str | None = None            # style sheet applied when rendering (OpenMoji's layers)


def words(identifier: str) -> str:
    """'arrow-big-left' -> 'arrow big left'. Numbers stay: most say what is drawn ('number-7', 'clock-hour-3',
    'dice-5'); the few that only count variants ('layers-2') are joined to their base concept in the split."""
    return " ".join(p for p in re.split(r"[-_\s]+", identifier.lower()) if p)


def base_name(name: str) -> str | None:
    """'layers 2' -> 'layers': the name without a trailing number, or None when there is none."""
    parts = name.split()
    return " ".join(parts[:-1]) if len(parts) > 1 and parts[-1].isdigit() else None


def phrase(text: str) -> str:
    """A keyword or category as caption text: 'hand-fingers-closed' -> 'hand fingers closed'."""
    return " ".join(re.split(r"[-_\s]+", text.lower().strip())).strip()


def captions(item: Item, max_tags: int = 3) -> list[str]:
    """Several captions for one image, the primary name first; every caption says the name (or an alias of
    it), so the class name of zero-shot evaluation is in every training caption of its concept."""
    out = [item.name, *item.aliases]
    out += [f"{item.name}, {category}" for category in item.categories[:2]]
    tags = [t for t in item.tags if t and t != item.name and t not in item.name]
    for start in range(0, min(len(tags), 2 * max_tags), max_tags):
        out.append(f"{item.name}: {', '.join(tags[start:start + max_tags])}")
    seen: set[str] = set()
    return [c for c in (" ".join(c.split()) for c in out) if c and not (c in seen or seen.add(c))]
