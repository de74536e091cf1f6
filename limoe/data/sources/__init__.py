"""Image sources of the corpus: installed packages of SVG artwork, each listed as captioned items.

Every source is a module (or a packs.PackSource) with `NAME`, `LICENSE`, `attribution()`, `version()` and
`items()`; an item is one SVG in one visual style with its name and the extra words the package ships for it
(aliases, tags, categories). Nothing is downloaded: the SVGs and their metadata are files of the installed packages.

    openmoji     OpenMoji emoji (CC BY-SA 4.0): styles color, line (the outline layer alone), flat (the
                 colour layer alone)
    tabler       Tabler Icons (MIT): line (outline), solid (filled)
    fontawesome  Font Awesome Free (icons CC BY 4.0): solid, line (the "regular" outline set); the brand
                 logos are left out (trademarks, named after companies rather than what they show)
    lucide       Lucide (ISC): line
    phosphor     Phosphor (MIT): thin, light, line (regular), bold, solid (fill), duotone
    material     Material Icons (Apache 2.0): solid (filled), outlined, rounded, sharp, duotone (two-tone)
    mdi          Material Design Icons (Apache 2.0): solid, line (the `-outline` twins)
    heroicons    Heroicons (MIT): line (outline), solid
                 (the last four: packs.py)

Tabler's and Lucide's line icons are also rendered at a light and a bold stroke weight (STROKE_WEIGHTS).

A style is a way of drawing shared across sources where it can be ("line" is Tabler's outline, Lucide, Phosphor's
regular weight...); the styles only one family draws keep their family's word (Phosphor's weights, Material's
rounded and sharp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

SOURCE_NAMES = ("openmoji", "tabler", "fontawesome", "lucide", "phosphor", "material", "mdi", "heroicons")
STYLES = ("color", "flat", "line", "solid", "thin", "light", "bold", "duotone", "outlined", "rounded", "sharp")
# A last word that names how an icon is drawn, not what it shows: "heart outline" is "heart" drawn in outline.
DRAWING_WORDS = ("outline", "outlined", "border")


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


# Tabler and Lucide draw every icon with one stroke, whose width both document as a setting (default 2 on a 24 px
# grid). Rendered also thinner and heavier, each becomes a family in three weights, like Phosphor.
STROKE_WEIGHTS = {"light": 1.0, "bold": 2.75}


def stroke_weights(item: Item) -> list[Item]:
    """The item (a stroke-drawn line icon) and its renders at the other STROKE_WEIGHTS, as styles of their own."""
    return [item] + [replace(item, style=style, css=f"*{{stroke-width:{width}}}")
                     for style, width in STROKE_WEIGHTS.items()]


def words(identifier: str) -> str:
    """'arrow-big-left' -> 'arrow big left'. Numbers stay: most say what is drawn ('number-7', 'clock-hour-3',
    'dice-5'); the few that only count variants ('layers-2') are joined to their base concept in the split."""
    return " ".join(p for p in re.split(r"[-_\s]+", identifier.lower()) if p)


def base_name(name: str) -> str | None:
    """'layers 2' -> 'layers', 'heart outline' -> 'heart': the name without a trailing number or drawing word,
    or None when there is none."""
    parts = name.split()
    variant = len(parts) > 1 and (parts[-1].isdigit() or parts[-1] in DRAWING_WORDS)
    return " ".join(parts[:-1]) if variant else None


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
