"""Training and evaluation data for a run: the tokenizer, the training stream with a resumable position,
and the held-out evaluation sets.

The order of training batches is a pure function of (seed, epoch, batch index): the stream's shuffle and
augmentation are seeded by (seed, epoch, part). So the data position is just (epoch, batches consumed), and
resuming replays the epoch's first batches without training on them (cheap next to a training step).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

from limoe.data import (BuiltinConfig, CsvPairs, DataError, ImageConfig, LoaderConfig, Tokenizer, WdsPairs,
                        builtin_captions, load_builtin, make_loader, train_tokenizer)
from limoe.data.stream import DataPosition
from limoe.train.config import TrainConfig


def builtin_config(cfg: TrainConfig) -> BuiltinConfig:
    return BuiltinConfig(max_concepts=cfg.data.max_concepts, cache_dir=cfg.data.cache_dir)


def corpus_config(cfg: TrainConfig):
    from limoe.data.corpus import CorpusConfig

    return CorpusConfig(max_concepts=cfg.data.max_concepts, cache_dir=cfg.data.cache_dir)


def corpus_filter(cfg: TrainConfig) -> dict:
    """The corpus's rows and captions a run trains on (data.corpus_*)."""
    from limoe.data.corpus.dataset import PLAIN

    return dict(styles=cfg.data.corpus_styles, sources=cfg.data.corpus_sources, captions=cfg.data.corpus_captions,
                templates=PLAIN if cfg.data.corpus_templates == "plain" else None)


def image_config(cfg: TrainConfig) -> ImageConfig:
    if cfg.data.augment:
        return ImageConfig(image_size=cfg.data.image_size, crop_scale=(cfg.data.crop_scale, 1.0),
                           jitter=cfg.data.jitter)
    return ImageConfig(image_size=cfg.data.image_size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter=0.0)


def training_pairs(cfg: TrainConfig, rank: int = 0, world_size: int = 1):
    """The training SampleStream; every rank yields the same number of samples (DDP needs equal steps)."""
    common = dict(image=image_config(cfg), train=True, seed=cfg.seed, rank=rank, world_size=world_size)
    d = cfg.data
    if d.source == "builtin":
        return load_builtin("train", cfg=builtin_config(cfg), drop_uneven=True, **common)
    if d.source == "corpus":
        from limoe.data.corpus import load_corpus

        return load_corpus("train", cfg=corpus_config(cfg), drop_uneven=True, **corpus_filter(cfg), **common)
    if d.source == "csv":
        return CsvPairs(d.train, d.csv_img_key, d.csv_caption_key, d.csv_separator, drop_uneven=True, **common)
    return WdsPairs(d.train, **common)


def training_captions(cfg: TrainConfig, skips: dict[str, int] | None = None) -> list[str]:
    """The training captions, cleaned exactly as the training stream cleans them, without reading images.

    Rows the stream would skip for their caption or their structure (not UTF-8, empty, a broken CSV row, a
    shard sample without image or caption, a damaged shard) are left out and added to `skips` by reason.
    """
    if cfg.data.source == "builtin":
        return builtin_captions("train", builtin_config(cfg))
    if cfg.data.source == "corpus":
        from limoe.data.corpus import corpus_captions

        # Every caption a pass can draw (the corpus's rows are all valid: its build checked every render).
        return corpus_captions("train", corpus_config(cfg), **corpus_filter(cfg))
    if cfg.data.source == "csv":
        source = CsvPairs(cfg.data.train, cfg.data.csv_img_key, cfg.data.csv_caption_key, cfg.data.csv_separator)
    else:
        source = WdsPairs(cfg.data.train)
    captions = list(source.caption_texts())
    if skips is not None:
        for reason, n in source.skips.totals().items():
            skips[reason] = skips.get(reason, 0) + n
    return captions


def make_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """Byte-level BPE on the training captions only, so held-out class names are not in its merges' making.

    The captions it left out are in `tokenizer.train_skips` (reason -> count): a run logs them beside the
    training stream's `skip_counts()`, which counts the same bad rows again each time a pass reads them.
    """
    skips: dict[str, int] = {}
    captions = training_captions(cfg, skips)
    return train_tokenizer(captions, vocab_size=cfg.data.vocab_size, context_length=cfg.data.context_length,
                           skips=skips)


class TrainBatches:
    """Endless batches from a StreamLoader, tracking (epoch, batch) so a run can resume mid-epoch exactly."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 position: DataPosition | None = None):
        if cfg.data.batch_size % world_size:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by the {world_size} ranks")
        self.local_batch = cfg.data.batch_size // world_size
        self.dataset = training_pairs(cfg, rank, world_size)
        if hasattr(self.dataset, "__len__") and len(self.dataset) // world_size < self.local_batch:
            # Known before reading anything (rows in the index, bad ones included): fail before training starts.
            raise DataError(f"{self.dataset.name}: {len(self.dataset)} rows, fewer per rank than one batch of "
                            f"{self.local_batch} (data.batch_size / ranks); lower data.batch_size or add data")
        self.loader = make_loader(self.dataset, LoaderConfig(batch_size=self.local_batch, drop_last=True,
                                                             num_workers=cfg.data.num_workers), tokenizer)
        self.position = position or DataPosition()
        self._past_skips: Counter[str] = Counter()  # skips of finished passes (the live counter restarts each pass)

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far in this run on this rank, by reason: finished passes plus the one under way.

        Cheap (a sum over a small shared-memory tensor), safe to call at any time from the training process,
        also while DataLoader workers run: each worker writes its own row, so mid-epoch counts are live (they
        include the few batches the workers have read ahead). A bad sample counts once per pass that read it.
        """
        return dict(sorted((self._past_skips + Counter(self.dataset.skips.totals())).items()))

    def __iter__(self) -> Iterator:
        pos = self.position
        while True:
            self.loader.epoch = pos.epoch
            skip, seen = pos.batch, 0
            for i, batch in enumerate(self.loader):
                seen += 1
                if i < skip:
                    continue
                pos.batch = i + 1
                yield batch
            if seen == 0:
                kept, workers = self.dataset.skips.yielded, self.loader.cfg.num_workers
                # Each worker batches its own share: enough samples in all can still leave every worker short.
                fix = (f"they are spread over {workers} workers, each short of a batch: lower data.num_workers"
                       if kept >= self.local_batch else "lower data.batch_size or add data")
                raise DataError(f"{self.dataset.name}: {kept} valid samples per rank give no full batch of "
                                f"{self.local_batch} (data.batch_size / ranks); {fix}")
            # The pass is over and its workers are gone: fold its counts in before the next pass resets them.
            self._past_skips.update(self.dataset.skips.totals())
            self.dataset.skips.reset()
            pos.epoch, pos.batch = pos.epoch + 1, 0


def make_batches(cfg: TrainConfig, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 position: DataPosition | None = None):
    """In-memory batches for the built-in data and the corpus (unless data.in_memory=false), else a streaming
    loader."""
    if cfg.data.source in ("builtin", "corpus") and cfg.data.in_memory:
        from limoe.train.in_memory import MemoryBatches

        if cfg.data.batch_size % world_size:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by the {world_size} ranks")
        # Stored unnormalised at twice the training size; MemoryBatches crops, jitters and normalises.
        stored = ImageConfig(image_size=2 * cfg.data.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        one = dict(image=stored, train=False, rank=0, world_size=1)
        caption_of = None
        if cfg.data.source == "corpus":
            from limoe.data.corpus import load_corpus

            # Read in row order, captions drawn per (seed, epoch, row) as the streaming loader draws them.
            dataset = load_corpus("train", cfg=corpus_config(cfg), sample_captions=True, seed=cfg.seed,
                                  **corpus_filter(cfg), **one)
            caption_of = lambda epoch, row: dataset.caption(row, epoch)  # noqa: E731
        else:
            dataset = load_builtin("train", cfg=builtin_config(cfg), **one)
        return MemoryBatches(dataset, tokenizer, cfg.data.batch_size, cfg.seed, image_config(cfg), rank,
                             world_size, augment=cfg.data.augment, position=position, caption_of=caption_of)
    return TrainBatches(cfg, tokenizer, rank, world_size, position)


def held_out_zero_shot(cfg: TrainConfig, image: ImageConfig, split: str = "test", **stream_kwargs):
    """(dataset, class names, templates) of the run's built-in data: the corpus's held-out concepts (split 'test':
    all styles pooled, whatever data.corpus_styles trains on, so a held-out style is part of the test) or its
    seen concepts in unseen renderings (split 'seen') for data.source=corpus, else the built-in dataset's
    held-out concepts (it has no seen split: None)."""
    if cfg.data.source == "corpus":
        from limoe.data.corpus import corpus_zero_shot

        return corpus_zero_shot("all", cfg=corpus_config(cfg), image=image, split=split, **stream_kwargs)
    if split == "seen":
        return None
    from limoe.data import builtin_zero_shot

    return builtin_zero_shot(cfg=builtin_config(cfg), image=image, **stream_kwargs)


def held_out_pairs(cfg: TrainConfig, image: ImageConfig, **stream_kwargs):
    """The test split (titles as captions) of the corpus for data.source=corpus, else of the built-in dataset."""
    if cfg.data.source == "corpus":
        from limoe.data.corpus import load_corpus

        return load_corpus("test", cfg=corpus_config(cfg), image=image, **stream_kwargs)
    return load_builtin("test", cfg=builtin_config(cfg), image=image, **stream_kwargs)


def eval_sets(cfg: TrainConfig):
    """The run's EvalSets (each configured part read whole by one rank): eval.zero_shot_dir and
    eval.retrieval_csv replace the built-in data's held-out concepts and pairs; the corpus adds its seen split."""
    from limoe.data.zero_shot import zero_shot_set
    from limoe.train.held_out import EvalSets

    image = ImageConfig(image_size=cfg.data.image_size)
    one = dict(rank=0, world_size=1)
    sets = EvalSets()
    builtin = cfg.data.source in ("builtin", "corpus")
    if cfg.eval.zero_shot:
        if cfg.eval.zero_shot_dir:
            ds = zero_shot_set(cfg.eval.zero_shot_dir, cfg.eval.class_names, cfg.eval.templates, image=image, **one)
            sets.zero_shot = (ds, ds.class_names, ds.templates)
        elif builtin:
            sets.zero_shot = held_out_zero_shot(cfg, image, **one)
    if cfg.eval.seen and builtin:
        sets.seen = held_out_zero_shot(cfg, image, split="seen", **one)
    if cfg.eval.retrieval:
        if cfg.eval.retrieval_csv:
            # the training CSV's columns and separator: an evaluation file of the user's is usually alike
            d = cfg.data
            sets.retrieval = CsvPairs(cfg.eval.retrieval_csv, d.csv_img_key, d.csv_caption_key, d.csv_separator,
                                      image=image, **one)
        elif builtin:
            sets.retrieval = held_out_pairs(cfg, image, **one)
    return sets
