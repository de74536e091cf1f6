"""Optional: more emoji styles found on the machine, in the built-in dataset's split.

Other emoji sets name their files by codepoints too: npm `emoji-datasource-google` (`img/google/64/
1f44d-1f3fd.png`), Noto Color Emoji PNGs (`emoji_u1f44d_1f3fd.png`), Twemoji (`1f44d-1f3fd.svg`). This
builder captions such a folder with the same names and puts every image in the split of its concept, so
a held-out concept stays held out in every style ("train on some styles, classify held-out concepts
in another"). Nothing here is needed for the default dataset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from limoe.data.builtin import CSV_COLUMNS, BuiltinConfig, _render, build_builtin_dataset, plan
from limoe.data.csv_dataset import write_csv

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_codepoints(stem: str) -> tuple[int, ...] | None:
    """'emoji_u1f44d_1f3fd' / '1F44D-1F3FD' / 'u1f44d' -> (0x1F44D, 0x1F3FD); None if not codepoints.
    Variation selectors are dropped: sets disagree on whether file names carry FE0F."""
    stem = re.sub(r"^(emoji_u|u)", "", stem.lower())
    parts = re.split(r"[-_ ]", stem)
    if not parts or not all(re.fullmatch(r"[0-9a-f]{2,6}", p) for p in parts):
        return None
    return tuple(cp for cp in (int(p, 16) for p in parts) if cp not in (0xFE0E, 0xFE0F))


def build_style(images_dir: str | os.PathLike, style: str, cfg: BuiltinConfig | None = None) -> dict[str, int]:
    """Write `<built-in dataset>/styles/<style>/{train,test}.csv` (CsvPairs format) for a folder of
    codepoint-named images (searched recursively); returns rows per split plus unmatched files."""
    cfg = cfg or BuiltinConfig()
    root = build_builtin_dataset(cfg)
    p = plan(cfg)
    # Same codepoints (without variation selectors) -> same emoji -> its name and its concept's split.
    known = {tuple(c for c in e.codepoints if c not in (0xFE0E, 0xFE0F)): (e.name, c) for e, c in zip(p.emoji, p.concept)}
    out = root / "styles" / style
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    unmatched = 0
    for path in sorted(Path(images_dir).rglob("*")):
        suffix = path.suffix.lower()
        cps = parse_codepoints(path.stem) if suffix in RASTER_SUFFIXES + (".svg",) else None
        if cps is None or cps not in known:
            unmatched += path.is_file()
            continue
        name, concept = known[cps]
        if suffix == ".svg":  # rendered like the built-in set; raster files are read in place
            target = out / "images" / (path.stem + ".png")
            target.write_bytes(_render((str(path), cfg.raster_size)))
            path = target
        rows["test" if concept in p.test else "train"].append((str(path.resolve()), name))
    for split, split_rows in rows.items():
        write_csv(out / f"{split}.csv", split_rows, *CSV_COLUMNS)
    return {"train": len(rows["train"]), "test": len(rows["test"]), "unmatched": unmatched}
