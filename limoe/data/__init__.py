"""Data: image-text formats (CSV/TSV, webdataset shards), classification folders, the tokenizer,
and the built-in OpenMoji dataset. See docs/data.md.

Typical use:

    train = load_builtin("train", image_size=64)                       # (image [3,S,S], caption)
    tok = train_tokenizer(builtin_captions("train"), vocab_size=4096)  # save next to the checkpoint
    for batch in make_loader(train, LoaderConfig(batch_size=256), tokenizer=tok): ...
    zs, class_names, templates = builtin_zero_shot(image_size=64)      # (image, class index)
"""

from limoe.data.builtin import (
    BuiltinConfig,
    build_builtin_dataset,
    builtin_captions,
    builtin_concepts,
    builtin_zero_shot,
    load_builtin,
)
from limoe.data.collate import PairBatch, PairCollate, collate_labels
from limoe.data.csv_dataset import CsvPairs, write_csv
from limoe.data.image_folder import ImageFolder
from limoe.data.loader import LoaderConfig, StreamLoader, make_loader
from limoe.data.stats import REASONS, DataError, DataNotFoundError, MissingColumnError, NoValidSamplesError
from limoe.data.tokenizer import TokenBatch, Tokenizer, train_tokenizer
from limoe.data.transforms import ImageConfig, ImageTransform
from limoe.data.wds import WdsLabels, WdsPairs, write_shards
from limoe.data.zero_shot import zero_shot_set

__all__ = [
    "BuiltinConfig", "build_builtin_dataset", "builtin_captions", "builtin_concepts", "builtin_zero_shot",
    "load_builtin", "PairBatch", "PairCollate", "collate_labels", "CsvPairs", "write_csv", "ImageFolder",
    "LoaderConfig", "StreamLoader", "make_loader", "REASONS", "DataError", "DataNotFoundError",
    "MissingColumnError", "NoValidSamplesError", "TokenBatch", "Tokenizer",
    "train_tokenizer", "ImageConfig", "ImageTransform", "WdsLabels", "WdsPairs", "write_shards", "zero_shot_set",
]
