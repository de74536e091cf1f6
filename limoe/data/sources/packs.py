"""Icon families from the JustMyResource packs on PyPI (`justmyresource-<family>`): each wheel ships its SVGs in an
`icons.zip` (one folder per weight or style, or none) and its upstream licence under the dist-info's `licenses/`.
The corpus reads both as files (the pack is never imported). These packs carry names only: no tags or aliases.

    phosphor   Phosphor (MIT): ~1,250 concepts in six weights, thin, light, regular (line), bold, fill (solid) and
               duotone (a regular outline over a 20%-grey fill)
    material   Material Icons, Google's official set (Apache 2.0): ~1,370 concepts in five styles, filled (solid),
               outlined, rounded (filled, round corners), sharp (filled, square corners) and two-tone (duotone:
               an outline over a 30%-grey fill). A concept with no outline form has its filled drawing as its
               outlined one: the corpus keeps identical renders of one concept once.
    mdi        Material Design Icons, the Pictogrammers' community set (Apache 2.0): ~7,400 icons in one folder;
               `<base>-outline` (1,900 of them) is the outline twin of `<base>`: style line, and it joins its base's
               concept in the split (sources.base_name); the others, mostly filled shapes, are style solid.
    heroicons  Heroicons by Tailwind Labs (MIT): ~320 concepts as 24 px outlines (line) and solid shapes. Its 20 px
               and 16 px solid sets, the solid drawings redrawn for small grids, are near copies at the corpus's
               sizes: left out.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

from limoe.data.sources import Item, words
from limoe.extras import locate


def svgs(module: str, feature: str) -> dict[str, str]:
    """Path inside icons.zip -> SVG markup, in path order."""
    with zipfile.ZipFile(locate(module, "data", feature) / "icons.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".svg"))
        return {n: archive.read(n).decode("utf-8") for n in names}


def licence(distribution: str) -> str:
    """The upstream licence texts the wheel carries (licenses/LICENSES/*), joined."""
    dist = metadata.distribution(distribution)
    texts = [dist.read_text(str(f).split(".dist-info/", 1)[1]) or "" for f in dist.files or ()
             if "/licenses/LICENSES/" in str(f)]
    return "\n\n".join(t.strip() for t in texts if t.strip())


@dataclass(frozen=True)
class PackSource:
    """A source (the interface of sources/__init__.py: NAME, LICENSE, version(), attribution(), items()) read from
    one pack; `style_of(path in icons.zip)` gives (style, key) or None for a file left out."""

    NAME: str
    LICENSE: str
    distribution: str
    credit: str  # the first line of the attribution
    style_of: Callable[[str], tuple[str, str] | None]

    def version(self) -> str:
        return metadata.version(self.distribution)

    def attribution(self) -> str:
        return (f"{self.credit}, via the Python package {self.distribution}. License: {self.LICENSE}. The icons "
                f"were rendered to PNG at a small size; no other change.\n\n{licence(self.distribution)}")

    def items(self) -> list[Item]:
        module = self.distribution.replace("-", "_")
        found = []
        for path, svg in svgs(module, f"the corpus's {self.NAME} icons").items():
            style_key = self.style_of(path)
            if style_key is not None:
                found.append(Item(self.NAME, style_key[0], style_key[1], words(style_key[1]), svg_text=svg))
        return found


def _in_folders(styles: dict[str, str], suffix: bool = False) -> Callable[[str], tuple[str, str] | None]:
    """Files in one folder per variant ("bold/heart-bold.svg"; `suffix`: the stem ends with "-<variant>")."""
    def style_of(path: str) -> tuple[str, str] | None:
        variant, _, file = path.rpartition("/")
        stem = file.removesuffix(".svg")
        if suffix:
            stem = stem.removesuffix(f"-{variant}")
        return (styles[variant], stem) if variant in styles else None

    return style_of


def _mdi_style(path: str) -> tuple[str, str]:
    stem = path.removesuffix(".svg")
    return ("line" if stem.endswith("-outline") else "solid"), stem


phosphor = PackSource("phosphor", "MIT", "justmyresource-phosphor", "Phosphor Icons (https://phosphoricons.com)",
                      _in_folders({"thin": "thin", "light": "light", "regular": "line", "bold": "bold",
                                   "fill": "solid", "duotone": "duotone"}, suffix=True))
material = PackSource("material", "Apache-2.0", "justmyresource-material-icons",
                      "Material Icons by Google (https://github.com/google/material-design-icons)",
                      _in_folders({"filled": "solid", "outlined": "outlined", "rounded": "rounded",
                                   "sharp": "sharp", "two-tone": "duotone"}))
mdi = PackSource("mdi", "Apache-2.0", "justmyresource-mdi",
                 "Material Design Icons by Pictogrammers (https://pictogrammers.com)", _mdi_style)
heroicons = PackSource("heroicons", "MIT", "justmyresource-heroicons",
                       "Heroicons by Tailwind Labs (https://heroicons.com)",
                       _in_folders({"24/outline": "line", "24/solid": "solid"}))
