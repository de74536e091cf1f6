"""Build the corpus once into a versioned cache folder (like the built-in dataset, beside it):

    <cache>/corpus-v<BUILD_VERSION>-<px>px-test<pct>[-n<max_concepts>]-<hash of the package versions>/
        images/<style>/<source>/<key>.png       RGBA renders (transparent background)
        train.csv                               filepath,title,concept,source,style,captions (JSON list)
        test.csv                                the held-out concepts (never trained on, in any rendering)
        seen.csv                                seen concepts in unseen renderings (split.seen_renderings)
        zeroshot/<view>/<class idx>/<...>.png   held-out concepts as ImageFolders: view = all (every style
        zeroshot/<view>/classnames.txt          pooled) or one style; class indices agree across views
        zeroshot/<view>/templates.txt
        seen/<view>/...                         the same for seen.csv, over the seen split's concepts
        manifest.json                           pairs per split x source x style, versions, build seconds
        ATTRIBUTION.txt, LICENSES/<source>.txt  what each source's licence asks for

The CSV files are also plain CsvPairs files (filepath, title). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from limoe.data.builtin import _link_or_copy, cache_root
from limoe.data.cache import is_built, write_atomically
from limoe.data.corpus.render import MIN_COVERAGE, render_all
from limoe.data.corpus.split import Split, seen_renderings, split_items
from limoe.data.csv_dataset import no_field_limit
from limoe.data.sources import SOURCE_NAMES, STYLES, Item, captions, fontawesome, lucide, openmoji, packs, tabler
from limoe.data.stats import DataError

BUILD_VERSION = 2  # bump when the build's output changes (naming, split rule, captions...)
MODULES = {m.NAME: m for m in (openmoji, tabler, fontawesome, lucide, packs.phosphor, packs.material, packs.mdi,
                                packs.heroicons)}
SPLITS = ("train", "test", "seen")
EVAL_FOLDERS = {"test": "zeroshot", "seen": "seen"}  # split -> its ImageFolder views
COLUMNS = ("filepath", "title", "concept", "source", "style", "captions")
# The zero-shot prompt is the caption alone, the one template every source's training captions use (dataset.py):
# a source's own ("an emoji of {}.") asks for that source's look. With the icon and emoji templates added, a
# model names icons as if they had to be emoji (seen-concept top-1 26.2% against 29.2%, docs/training.md).
ZERO_SHOT_TEMPLATES = ("{}",)


@dataclass
class CorpusConfig:
    raster_size: int = 64            # pixels of the stored renders (the loader resizes to image_size)
    # Share of concepts held out in every style and source. 0.1, not the built-in 0.2: the corpus has ~13,000
    # concepts, so 10% still holds out over 1,000 (the built-in 366) and leaves the rest to training.
    test_fraction: float = 0.1
    # Share of the trained concepts with three or more renderings that give one rendering to the seen-concept test
    # (split.seen_renderings): 0.4 tests ~2,700 concepts and keeps over 40,000 pairs for training.
    seen_fraction: float = 0.4
    max_concepts: int | None = None  # a small deterministic subset of concepts (tests, quick runs)
    cache_dir: str | None = None     # default: the limoe cache (see builtin.cache_root)
    workers: int | None = None       # rendering processes (default: all cores)


def versions() -> dict[str, str]:
    return {name: module.version() for name, module in MODULES.items()}


def corpus_dir(cfg: CorpusConfig | None = None) -> Path:
    cfg = cfg or CorpusConfig()
    # The package versions go in as a hash: a new icon release builds a new folder instead of reusing a stale one.
    tag = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode()).hexdigest()[:8]
    name = (f"corpus-v{BUILD_VERSION}-{cfg.raster_size}px-test{round(cfg.test_fraction * 100)}"
            f"-seen{round(cfg.seen_fraction * 100)}")
    if cfg.max_concepts is not None:
        name += f"-n{cfg.max_concepts}"
    return cache_root(cfg) / f"{name}-{tag}"  # type: ignore[arg-type]  # cache_root reads .cache_dir only


def all_items() -> list[Item]:
    return [item for module in MODULES.values() for item in module.items()]


def _class_names(s: Split, concepts: set[str]) -> dict[str, tuple[str, str]]:
    """concept label -> (folder, class name): sorted by name; a name two concepts share gets its label."""
    labels = sorted(concepts, key=lambda lab: (s.names[lab], lab))
    counts = Counter(s.names[lab] for lab in labels)
    width = max(4, len(str(len(labels))))
    return {lab: (f"{i:0{width}d}", s.names[lab] if counts[s.names[lab]] == 1 else f"{s.names[lab]} ({lab})")
            for i, lab in enumerate(labels)}


def _write_zero_shot(out: Path, test_rows: list[dict], classes: dict[str, tuple[str, str]], name: str) -> None:
    for view in ("all", *STYLES):
        rows = [r for r in test_rows if view in ("all", r["style"])]
        if not rows:
            continue
        zs = out / name / view
        for r in rows:
            folder = zs / classes[r["concept"]][0]
            folder.mkdir(parents=True, exist_ok=True)
            _link_or_copy(out / r["filepath"], folder / f"{r['style']}-{r['source']}-{Path(r['filepath']).name}")
        used = sorted({classes[r["concept"]] for r in rows})
        (zs / "classnames.txt").write_text("".join(f"{f}\t{n}\n" for f, n in used), encoding="utf-8")
        (zs / "templates.txt").write_text("".join(t + "\n" for t in ZERO_SHOT_TEMPLATES), encoding="utf-8")


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f, no_field_limit():
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _shared_pictures(s: Split, renders: list[tuple[bytes, float]]) -> set[tuple[str, bytes]]:
    """(style, PNG) of renders that several concepts share: no caption can tell them apart, so they are left out.
    The OpenMoji line layer of every flag, for one, is the same empty rectangle."""
    concepts: dict[tuple[str, bytes], set[str]] = defaultdict(set)
    for item, concept, (png, _) in zip(s.items, s.concept, renders):
        concepts[(item.style, png)].add(concept)
    return {key for key, labels in concepts.items() if len(labels) > 1}


def _write(out: Path, s: Split, renders: list[tuple[bytes, float]], cfg: CorpusConfig, t0: float) -> dict:
    kept: list[dict] = []
    blank: Counter[str] = Counter()
    ambiguous: Counter[str] = Counter()
    duplicate: Counter[str] = Counter()
    shared = _shared_pictures(s, renders)
    pictures: set[tuple[str, bytes]] = set()  # (concept, PNG) already kept
    for item, concept, (png, coverage) in zip(s.items, s.concept, renders):
        where = f"{item.source}/{item.style}"
        if coverage < MIN_COVERAGE:
            blank[where] += 1
            continue
        if (item.style, png) in shared:
            ambiguous[where] += 1
            continue
        if (concept, png) in pictures:  # e.g. Material's outlined drawing of a concept with no outline form
            duplicate[where] += 1
            continue
        pictures.add((concept, png))
        rel = f"images/{item.style}/{item.source}/{item.key}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(png)
        kept.append(dict(filepath=rel, title=item.name, concept=concept, source=item.source, style=item.style,
                         captions=json.dumps(captions(item), ensure_ascii=False)))
    seen = seen_renderings([r["concept"] for r in kept], [r["filepath"] for r in kept], s.test, cfg.seen_fraction)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for i, r in enumerate(kept):
        rows["test" if r["concept"] in s.test else "seen" if i in seen else "train"].append(r)
    for split, split_rows in rows.items():
        _write_csv(out / f"{split}.csv", split_rows)
    for split, folder in EVAL_FOLDERS.items():
        _write_zero_shot(out, rows[split], _class_names(s, {r["concept"] for r in rows[split]}), folder)

    (out / "LICENSES").mkdir()
    used = sorted({r["source"] for split_rows in rows.values() for r in split_rows})
    for name in used:
        (out / "LICENSES" / f"{name}.txt").write_text(MODULES[name].attribution() + "\n", encoding="utf-8")
    (out / "ATTRIBUTION.txt").write_text(
        "This corpus is rendered from the following works; each one's full notice is in LICENSES/.\n\n"
        + "".join(f"- {n} {MODULES[n].version()}: {MODULES[n].LICENSE}\n" for n in used), encoding="utf-8")

    def counts(key) -> dict:
        return {split: dict(sorted(Counter(key(r) for r in split_rows).items())) for split, split_rows in rows.items()}

    manifest = {
        "build_version": BUILD_VERSION,
        "sources": {n: {"version": MODULES[n].version(), "license": MODULES[n].LICENSE} for n in used},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "workers")},
        "pairs": {split: len(r) for split, r in rows.items()},
        "pairs_by_source": counts(lambda r: r["source"]),
        "pairs_by_style": counts(lambda r: r["style"]),
        "pairs_by_source_style": counts(lambda r: f"{r['source']}/{r['style']}"),
        "concepts": {split: len({r["concept"] for r in split_rows}) for split, split_rows in rows.items()},
        "renderings_per_trained_concept": dict(sorted(Counter(Counter(
            r["concept"] for r in rows["train"] + rows["seen"]).values()).items())),
        "blank_renders_left_out": dict(sorted(blank.items())),
        "ambiguous_renders_left_out": dict(sorted(ambiguous.items())),
        "duplicate_renders_left_out": dict(sorted(duplicate.items())),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def build_corpus(cfg: CorpusConfig | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Build (once) and return the corpus folder; later calls return at once from the cache."""
    cfg = cfg or CorpusConfig()
    final = corpus_dir(cfg)
    if not force and is_built(final):
        return final
    t0 = time.perf_counter()
    s = split_items(all_items(), cfg.test_fraction, cfg.max_concepts)
    if not quiet:
        print(f"limoe: building the image-text corpus ({len(s.items)} images of {len(s.names)} concepts from "
              f"{', '.join(SOURCE_NAMES)}; {cfg.raster_size}px) into {final} — once, under a minute...",
              file=sys.stderr, flush=True)
    renders = render_all(s.items, cfg.raster_size, cfg.workers)
    manifest = write_atomically(final, lambda tmp: _write(tmp, s, renders, cfg, t0), force)
    if not quiet:
        pairs, concepts = manifest["pairs"], manifest["concepts"]
        print(f"limoe: corpus ready: {pairs['train']} train pairs; tests: {pairs['seen']} unseen renderings of "
              f"{concepts['seen']} trained concepts, {pairs['test']} images of {concepts['test']} held-out concepts; "
              f"{time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
    return final


def read_rows(root: Path, split: str) -> list[dict]:
    """The rows of train.csv / test.csv as dicts, captions decoded to lists."""
    import csv

    path = root / f"{split}.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f, no_field_limit():
            rows = list(csv.DictReader(f))
        for r in rows:
            r["captions"] = json.loads(r["captions"])
    except (csv.Error, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:  # changed since it was built
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}); rebuild the corpus: limoe data build "
                        f"--dataset corpus --force") from None
    return rows
