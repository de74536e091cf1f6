"""Text tokenizer: byte-level BPE trained with HF `tokenizers`, saved as `tokenizer.json` with the model.

Everything needed to reproduce the encoding (vocabulary, merges, the EOS post-processor, truncation and
padding to the fixed context length) lives in that one JSON file, so a checkpoint and its tokenizer.json
are a complete pair. Any other tokenizer.json (e.g. from another CLIP-style model) can be loaded too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from limoe.data.stats import DataError, SkipError, warn_skips
from limoe.data.stream import clean_caption
from limoe.deprecation import renamed_arguments, renamed_attribute

# Batches of ~16-token captions gain nothing from the Rust thread pool, and a pool that exists before
# DataLoader workers fork makes tokenizers print a warning and disable itself in every worker.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAD, EOS = "<pad>", "<eos>"
DEFAULT_CONTEXT_LENGTH = 16
# Tokenizer training reads only the start of a longer caption: the model never sees more than a context
# of tokens, and BPE training time grows much faster than linearly with the length of one text (a single
# 140,000-character caption took 7 s).
MAX_TRAIN_CHARS = 1024


@dataclass
class TokenBatch:
    ids_BT: torch.Tensor           # int64 [B, T] token ids, padded with pad_id
    padding_mask_BT: torch.Tensor  # bool  [B, T] True at padding (key_padding_mask convention)
    eos_index_B: torch.Tensor      # int64 [B] position of the last real token (EOS unless truncated away)

    ids_BL = renamed_attribute("ids_BT")
    padding_mask_BL = renamed_attribute("padding_mask_BT")


TokenBatch.__init__ = renamed_arguments(ids_BL="ids_BT", padding_mask_BL="padding_mask_BT")(TokenBatch.__init__)


class Tokenizer:
    """Fixed-length encoding: ids + padding mask, truncated so the EOS token always survives."""

    def __init__(self, hf: HFTokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH):
        self.hf = hf
        self.context_length = context_length
        # Captions left out of training by reason ('bad_encoding', 'empty_caption', ...); set by
        # train_tokenizer, empty for a loaded tokenizer.
        self.train_skips: dict[str, int] = {}
        pad_id = hf.token_to_id(PAD)
        self.pad_id = 0 if pad_id is None else pad_id  # masked out anyway, so any id works as filler
        self.eos_id = hf.token_to_id(EOS)
        # Truncation accounts for tokens the post-processor adds, so EOS is kept at the last position.
        hf.enable_truncation(max_length=context_length)
        hf.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=PAD)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: list[str]) -> TokenBatch:
        encodings = self.hf.encode_batch(list(texts))
        ids_BT = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        valid_BT = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        eos_index_B = valid_BT.sum(1).clamp(min=1) - 1
        return TokenBatch(ids_BT=ids_BT, padding_mask_BT=~valid_BT, eos_index_B=eos_index_B)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json (a folder path gets `tokenizer.json` inside it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self.hf.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike, context_length: int | None = None) -> "Tokenizer":
        """Load any tokenizer.json; the context length saved in it is kept unless one is given."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        hf = HFTokenizer.from_file(path)
        if context_length is None:
            saved = hf.truncation
            context_length = saved["max_length"] if saved else DEFAULT_CONTEXT_LENGTH
        return cls(hf, context_length)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096,
                    context_length: int = DEFAULT_CONTEXT_LENGTH, lowercase: bool = True,
                    skips: dict[str, int] | None = None) -> Tokenizer:
    """Byte-level BPE on `texts` (well under a second for tens of thousands of captions).

    Byte-level means no unknown tokens: any UTF-8 caption encodes. Lowercasing (default) suits small
    caption sets where "Thumbs up" and "thumbs up" should not compete for vocabulary. Every text is
    cleaned as the training stream cleans captions; those it would skip (not UTF-8, empty) are left out
    and counted in `tokenizer.train_skips`, added to `skips` (counts from reading the source) if given.
    Only the first MAX_TRAIN_CHARS characters of a text are read.
    """
    counts = dict(skips or {})
    cleaned: list[str] = []
    for text in texts:
        try:
            cleaned.append(clean_caption(text)[:MAX_TRAIN_CHARS])
        except SkipError as e:
            counts[e.reason] = counts.get(e.reason, 0) + 1
    if not cleaned:
        raise DataError(f"no usable caption to train the tokenizer on ({counts or 'no captions'}); "
                        f"check the caption column or the shards' .txt/.json files")
    warn_skips("tokenizer training captions", counts, kept=len(cleaned))
    hf = HFTokenizer(models.BPE())
    if lowercase:
        from tokenizers import normalizers

        hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(cleaned, trainer=trainer)
    hf.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, hf.token_to_id(EOS))])
    tokenizer = Tokenizer(hf, context_length)
    tokenizer.train_skips = {r: n for r, n in counts.items() if n}
    return tokenizer
