"""Font Awesome Free from the PyPI package `fontawesomefree`: solid and regular (outline) icons.

`metadata/icons.json` gives each icon a label ("Face Smile"), search terms, alias names and the emoji it
stands for (`aliases.unicodes.composite`, e.g. 1f642 for face-smile): those codepoints put the icon in the
concept of that emoji. `metadata/categories.yml` lists icons per category. Brand logos are left out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from limoe.data.sources import Item, phrase, words
from limoe.extras import locate

NAME = "fontawesome"
LICENSE = "CC BY 4.0 (icons)"
STYLES = {"solid": "solid", "regular": "line"}


def _root() -> Path:
    return locate("fontawesomefree", "data", "the corpus's Font Awesome icons") / "static" / "fontawesomefree"


def version() -> str:
    return metadata.version("fontawesomefree")


def attribution() -> str:
    licence = (_root() / "LICENSE.txt").read_text(encoding="utf-8")
    return ("Font Awesome Free by Fonticons, Inc. (https://fontawesome.com), via the Python package "
            "fontawesomefree. Icons: CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). The icons were "
            "rendered to PNG at a small size; no other change.\n\n" + licence.strip())


def categories(path: Path) -> dict[str, list[str]]:
    """icon name -> category labels, from the fixed layout of categories.yml (no YAML parser needed):
    `<id>:` / `  icons:` / `    - <icon>` ... / `  label: <Label>`."""
    out: dict[str, list[str]] = defaultdict(list)
    members: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(" "):
            members = []
        elif line.strip().startswith("- "):
            members.append(line.strip()[2:].strip())
        elif line.strip().startswith("label:"):
            label = phrase(line.split(":", 1)[1].strip().strip("\"'"))
            for icon in members:
                out[icon].append(label)
    return out


def _codepoints(entry: dict) -> tuple[int, ...]:
    composite = (entry.get("aliases") or {}).get("unicodes", {}).get("composite", [])
    # Private-use code points are Font Awesome's own, not emoji.
    return tuple(cp for cp in (int(c, 16) for c in composite) if not 0xE000 <= cp <= 0xF8FF)


def items() -> list[Item]:
    root = _root()
    table = json.loads((root / "metadata" / "icons.json").read_text(encoding="utf-8"))
    cats = categories(root / "metadata" / "categories.yml")
    found = []
    for icon in sorted(table):
        entry = table[icon]
        name = " ".join(entry.get("label", "").lower().split()) or words(icon)
        aliases = tuple(words(a) for a in (entry.get("aliases") or {}).get("names", []) if words(a) != name)
        tags = tuple(phrase(t) for t in (entry.get("search") or {}).get("terms", []))
        for style in entry.get("styles", []):
            path = root / "svgs" / style / f"{icon}.svg"
            if style in STYLES and path.is_file():
                found.append(Item(NAME, STYLES[style], icon, name, aliases=aliases, tags=tags,
                                  categories=tuple(cats.get(icon, ())), codepoints=_codepoints(entry),
                                  svg_path=str(path)))
    return found
