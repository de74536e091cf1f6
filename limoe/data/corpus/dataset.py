"""Reading the corpus: (image, caption) pairs with a caption drawn afresh each epoch, filtered by style/source.

Each image has several captions (its name, aliases, "name, category", "name: tag, tag, tag"); a training pass
draws one of them and one prompt template of its source, seeded by (seed, epoch, row), so a pass is
reproducible and the model sees every phrasing over the epochs. Evaluation (train=False) reads the title.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch

from limoe.data.corpus.build import EVAL_FOLDERS, SPLITS, CorpusConfig, build_corpus, read_rows
from limoe.data.image_folder import ImageFolder
from limoe.data.sources import SOURCE_NAMES, STYLES
from limoe.data.stats import DataError
from limoe.data.stream import Record, SampleStream, clean_caption, deal_indices, mix_seed, read_file
from limoe.data.transforms import ImageConfig

# The caption ends each template: captions such as "heart: love, emotion" read badly inside "a {} icon.".
EMOJI = ("{}", "an emoji of {}.", "a picture of {}.")
ICON = ("{}", "an icon of {}.", "a drawing of {}.")
TEMPLATES = {**{name: ICON for name in SOURCE_NAMES}, "openmoji": EMOJI}
PLAIN = {name: ("{}",) for name in SOURCE_NAMES}  # the caption alone


def _check(kind: str, chosen: Sequence[str] | None, known: Sequence[str]) -> set[str] | None:
    if chosen is None:
        return None
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        raise DataError(f"corpus {kind}s must be some of {list(known)}, got {list(chosen)}")
    return set(chosen)


CAPTION_KINDS = ("all", "names")


def _is_name(caption: str, title: str) -> bool:
    """A name or an alias, not a "name, category" or "name: tags" caption (sources.captions)."""
    return not caption.startswith((f"{title}, ", f"{title}: "))


class CorpusPairs(SampleStream):
    """(image [3,S,S], caption) of one split of a built corpus; `styles` / `sources` keep only those rows
    (e.g. train on line and solid, keep colour for a held-out-style test); `captions="names"` draws training
    captions from each image's name and aliases only, without its category and tag captions."""

    def __init__(self, root: str | os.PathLike, split: str = "train", styles: Sequence[str] | None = None,
                 sources: Sequence[str] | None = None, sample_captions: bool | None = None,
                 templates: dict[str, Sequence[str]] | None = None, captions: str = "all", **stream_kwargs):
        if split not in SPLITS:
            raise DataError(f"corpus split must be one of {list(SPLITS)}, not {split!r}")
        root = Path(root)
        super().__init__(name=str(root / f"{split}.csv"), **stream_kwargs)
        keep_styles, keep_sources = _check("style", styles, STYLES), _check("source", sources, SOURCE_NAMES)
        rows = [r for r in read_rows(root, split) if (keep_styles is None or r["style"] in keep_styles)
                and (keep_sources is None or r["source"] in keep_sources)]
        if not rows:
            raise DataError(f"{self.name}: no rows of styles {styles} and sources {sources}")
        if captions not in CAPTION_KINDS:
            raise DataError(f"corpus captions must be one of {list(CAPTION_KINDS)}, not {captions!r}")
        if captions == "names":
            for r in rows:
                r["captions"] = [c for c in r["captions"] if _is_name(c, r["title"])]
        self.paths = [str(root / r["filepath"]) for r in rows]
        self.titles = [r["title"] for r in rows]
        self.captions = [r["captions"] for r in rows]
        self.sources = [r["source"] for r in rows]
        self.styles = [r["style"] for r in rows]
        self.concepts = [r["concept"] for r in rows]
        self.sample_captions = self.shuffle if sample_captions is None else sample_captions
        self.templates = {**TEMPLATES, **(templates or {})}

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, i: int, epoch: int | None = None) -> str:
        """Row i's caption in `epoch` (default: the current one): drawn when sampling, else the title."""
        if not self.sample_captions:
            return self.titles[i]
        # Python's Random from a mixed 63-bit seed: the same caption for (seed, epoch, row) in every process.
        rng = random.Random(mix_seed(self.seed, self.epoch if epoch is None else epoch, i))
        return rng.choice(self.templates[self.sources[i]]).format(rng.choice(self.captions[i]))

    def caption_texts(self) -> Iterator[str]:
        """Every caption a pass can draw (all captions x all templates of each row), each once: the tokenizer is
        then trained on every phrasing the model will read, and on the training split only."""
        seen: set[str] = set()
        for i in range(len(self)):
            options = ([self.titles[i]] if not self.sample_captions else
                       [t.format(c) for c in self.captions[i] for t in self.templates[self.sources[i]]])
            for text in map(clean_caption, options):  # exactly what a pass yields
                if text not in seen:
                    seen.add(text)
                    yield text

    def records(self, part: int, parts: int, gen: torch.Generator | None) -> Iterator[Record]:
        for i in deal_indices(len(self.paths), part, parts, gen, self.drop_uneven):
            yield Record(key=str(i), image=read_file(self.paths[i]), target=self.caption(i))


def load_corpus(split: str = "train", image_size: int = 64, train: bool | None = None,
                cfg: CorpusConfig | None = None, image: ImageConfig | None = None,
                styles: Sequence[str] | None = None, sources: Sequence[str] | None = None,
                **stream_kwargs) -> CorpusPairs:
    """The corpus's pairs (built on first use); train (augmentation, shuffling, caption sampling) defaults to
    split == 'train'. The test split, read with titles, is the retrieval set."""
    image = image or ImageConfig(image_size=image_size)
    return CorpusPairs(build_corpus(cfg), split, styles, sources, image=image,
                       train=(split == "train") if train is None else train, **stream_kwargs)


class CorpusZeroShot(ImageFolder):
    """The held-out concepts in every style pooled (`zeroshot/all`, images named <style>-<source>-<key>.png).
    `parts()` gives each style's images on their own, scored against every held-out class: one style's accuracy
    is then comparable with another's and with the pooled one."""

    def parts(self) -> dict[str, ImageFolder]:
        def style_of(path: str) -> str:
            return os.path.basename(path).split("-", 1)[0]

        return {s: self.where(lambda p, s=s: style_of(p) == s) for s in sorted(set(map(style_of, self.paths)))}


def corpus_zero_shot(view: str = "all", image_size: int = 64, cfg: CorpusConfig | None = None,
                     image: ImageConfig | None = None, split: str = "test",
                     **stream_kwargs) -> tuple[ImageFolder, list[str], list[str]]:
    """(dataset of (image, class index), class names, templates) over the held-out concepts (split 'test') or the
    unseen renderings of seen concepts (split 'seen'), in one style (its own classes) or all styles pooled
    (view='all': a CorpusZeroShot, which also scores each style against all of the split's classes)."""
    if view not in ("all", *STYLES):
        raise DataError(f"corpus zero-shot view must be 'all' or one of {list(STYLES)}, not {view!r}")
    if split not in EVAL_FOLDERS:
        raise DataError(f"corpus zero-shot split must be one of {list(EVAL_FOLDERS)}, not {split!r}")
    zs = build_corpus(cfg) / EVAL_FOLDERS[split] / view
    if not zs.is_dir():
        raise DataError(f"{zs}: no {split} images in style {view!r} (too small a max_concepts?)")
    folder = CorpusZeroShot if view == "all" else ImageFolder
    ds = folder(zs, zs / "classnames.txt", zs / "templates.txt", image=image or ImageConfig(image_size=image_size),
                **stream_kwargs)
    return ds, ds.class_names, ds.templates


def corpus_captions(split: str = "train", cfg: CorpusConfig | None = None, styles: Sequence[str] | None = None,
                    sources: Sequence[str] | None = None, captions: str = "all",
                    templates: dict[str, Sequence[str]] | None = None) -> list[str]:
    """Every caption a training pass over the split can draw (for the tokenizer)."""
    return list(CorpusPairs(build_corpus(cfg), split, styles, sources, sample_captions=True, captions=captions,
                            templates=templates).caption_texts())
