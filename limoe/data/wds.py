"""webdataset tar shards: `<key>.<png|jpg|...>` + `<key>.txt` (or `<key>.json` with a "caption") per sample.

Shards are read as a stream, one tar at a time, with the `webdataset` package's tar iterator; the split
over ranks/workers stays ours so that it is exact: whole shards are dealt out when there are at least as
many shards as readers, otherwise every reader scans all shards and keeps every `parts`-th sample.
"""

from __future__ import annotations

import glob
import json
import lzma
import os
import re
import tarfile
import zlib
from typing import Iterable, Iterator

import torch
from limoe.extras import require

from limoe.data.stats import DataError, DataNotFoundError, SkipError
from limoe.data.stream import Record, SampleStream, mix_seed

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def expand_shards(pattern: str) -> list[str]:
    """'a/{000..009}.tar::b/*.tar' -> existing shard paths, in order; a clear error naming what is wrong.

    `::` separates several patterns (open_clip's convention); each may use brace ranges/lists and globs.
    """
    if not pattern or not pattern.strip():
        raise DataError("empty webdataset shard pattern: pass e.g. data/train-{000000..000127}.tar")
    braceexpand = require("braceexpand", "wds", "webdataset shards")
    shards: list[str] = []
    for sub in pattern.split("::"):
        try:
            expanded = list(braceexpand.braceexpand(sub))
        except braceexpand.UnbalancedBracesError:
            raise DataError(f"malformed shard pattern {sub!r}: unbalanced braces; "
                            f"write ranges as {{000..127}}") from None
        for name in expanded:
            if any(c in name for c in "{}"):
                raise DataError(f"malformed shard pattern {sub!r}: cannot expand {name!r}; "
                                f"write ranges as {{000..127}}")
            matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
            if not matches or not all(os.path.isfile(m) for m in matches):
                missing = name if not matches else next(m for m in matches if not os.path.isfile(m))
                raise DataNotFoundError(f"shard pattern {sub!r}: no shard file {missing!r}; "
                                        f"check the path and the brace range")
            shards.extend(matches)
    return shards


class TruncatedShard(tarfile.TarError):
    """A shard that ends before its end-of-archive marker: whole samples may be missing at the cut."""


def _is_meta(name: str) -> bool:
    # webdataset's convention: "__*__" members are shard metadata, not samples.
    return re.match(r"__[^/]*__($|/)", name) is not None


def iter_tar_files(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file of one tar (plain or compressed), in order.

    Raises a tarfile.TarError (or OSError, EOFError for compressed data) at the first damage. Python's tarfile
    ends silently at a header that is cut short or fails its checksum, and a tar cut exactly at a member
    boundary looks complete; so after the last member the end-of-archive marker (a zero block) must follow.
    Every tar writer puts it there, and without it a cut anywhere is caught.
    """
    with tarfile.open(path, mode="r:*") as tar:
        while (info := tar.next()) is not None:
            tar.members = []  # tar.next() keeps every header otherwise; a shard can hold millions
            if not info.isreg() or _is_meta(info.name):
                continue
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise TruncatedShard(f"{info.name}: {len(data)} of {info.size} bytes")
            yield info.name, data
        tar.fileobj.seek(tar.offset)
        end = tar.fileobj.read(tarfile.BLOCKSIZE)
        if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
            raise TruncatedShard(f"no end-of-archive marker at byte {tar.offset}")


def iter_tar_samples(path: str, on_bad_shard) -> Iterator[dict[str, bytes]]:
    """Samples (dict extension -> bytes, plus '__key__') of one tar shard, in file order.

    A truncated or corrupt shard ends early: the samples before the damage are kept and the damage is
    reported once through `on_bad_shard` (a long run must survive one bad shard). A zero-byte file is a
    bad shard too (it is not a tar); a tar with no members is just empty.
    """
    base_plus_ext = require("webdataset.tariterators", "wds", "webdataset shards").base_plus_ext
    current: dict | None = None
    try:
        for name, data in iter_tar_files(path):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError):  # damage, any codec
        on_bad_shard()
    if current is not None:
        yield current


def split_sample(sample: dict) -> tuple[bytes, bytes | str]:
    """(image bytes, raw caption) of a shard sample, or SkipError('incomplete_sample' | 'bad_encoding')."""
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        raise SkipError("incomplete_sample", f"{sample['__key__']}: no image")
    if "txt" in sample:
        return image, sample["txt"]
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SkipError("bad_encoding", f"{sample['__key__']}.json") from None
        caption = next((meta[k] for k in ("caption", "text", "title") if isinstance(meta, dict) and k in meta), None)
        if not isinstance(caption, str):  # missing, or null / a number / a list: not a caption
            raise SkipError("incomplete_sample", f"{sample['__key__']}: json without a caption string")
        return image, caption
    raise SkipError("incomplete_sample", f"{sample['__key__']}: no caption")


class _Raw:
    """Marks a sample whose image/caption split is deferred to decode_target (so skips are counted)."""

    __slots__ = ("sample",)

    def __init__(self, sample: dict):
        self.sample = sample


class WdsPairs(SampleStream):
    """Image-text pairs from webdataset tar shards; yields (image [3,S,S], caption str).

    Streams: at most `shuffle_buffer` decoded-free raw samples per reader are held in memory.
    """

    def __init__(self, pattern: str, shuffle_buffer: int = 1000, **stream_kwargs):
        self.shards = expand_shards(pattern)
        super().__init__(name=pattern, **stream_kwargs)
        self.shuffle_buffer = shuffle_buffer

    def _stream(self, part: int, parts: int, gen: torch.Generator | None) -> Iterator[dict]:
        shards = self.shards
        if gen is not None:
            shards = [shards[i] for i in torch.randperm(len(shards), generator=gen).tolist()]
        bad = lambda: self.skips.skip("bad_shard")  # noqa: E731
        if len(shards) >= parts:
            for shard in shards[part::parts]:
                yield from iter_tar_samples(shard, bad)
        else:
            i = 0
            for shard in shards:
                # Every reader scans every shard, so only one of them (part 0) counts a shard's damage.
                for sample in iter_tar_samples(shard, bad if part == 0 else (lambda: None)):
                    if i % parts == part:
                        yield sample
                    i += 1

    def records(self, part: int, parts: int, gen: torch.Generator | None) -> Iterator[Record]:
        stream = self._stream(part, parts, gen)
        if gen is not None and self.shuffle_buffer > 1:
            stream = buffer_shuffle(stream, self.shuffle_buffer, mix_seed(self.seed, self.epoch, part, 1))
        for sample in stream:
            yield Record(key=sample["__key__"], image=lambda s=sample: self._image(s), target=_Raw(sample))

    def _image(self, sample: dict) -> bytes:
        return split_sample(sample)[0]

    def decode_target(self, raw) -> str:
        return super().decode_target(split_sample(raw.sample)[1])


class WdsLabels(WdsPairs):
    """Classification samples from webdataset shards in CLIP_benchmark's layout: `<key>.<png|jpg|webp...>` and
    `<key>.cls` (the class index as text); yields (image [3,S,S], class index). A sample without a label, or with
    one that is not an index below `num_classes`, is skipped and counted."""

    target_kind = "label"

    def __init__(self, pattern: str, num_classes: int, **stream_kwargs):
        super().__init__(pattern, shuffle_buffer=0, **stream_kwargs)
        self.num_classes = num_classes

    def _image(self, sample: dict) -> bytes:
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            raise SkipError("incomplete_sample", f"{sample['__key__']}: no image")
        return image

    def decode_target(self, raw) -> int:
        sample = raw.sample
        if "cls" not in sample:
            raise SkipError("incomplete_sample", f"{sample['__key__']}: no .cls label")
        text = sample["cls"].decode("utf-8", errors="replace").strip()
        if not (text.isdigit() and int(text) < self.num_classes):
            raise SkipError("bad_label", f"{sample['__key__']}.cls: {text[:20]!r} is no class index below "
                                         f"{self.num_classes}")
        return int(text)


def buffer_shuffle(items: Iterable, size: int, seed: int) -> Iterator:
    """Approximate streaming shuffle with a fixed-size buffer (webdataset's usual strategy), seeded."""
    gen = torch.Generator().manual_seed(seed)
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(torch.randint(0, size, (1,), generator=gen))
        buf[j], item = item, buf[j]
        yield item
    while buf:
        j = int(torch.randint(0, len(buf), (1,), generator=gen))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def write_shards(samples: Iterable[tuple[str, bytes, str]], pattern: str, maxcount: int = 10000,
                 image_ext: str = "png") -> list[str]:
    """Write (key, image bytes, caption) samples to shards `pattern % i` (e.g. 'out/pairs-%06d.tar')."""
    os.makedirs(os.path.dirname(os.path.abspath(pattern % 0)), exist_ok=True)
    paths: list[str] = []
    writer, count = None, 0
    for key, image, caption in samples:
        if writer is None or count == maxcount:
            if writer is not None:
                writer.close()
            paths.append(pattern % len(paths))
            # mtime fixed so the same samples give byte-identical shards.
            writer, count = require("webdataset", "wds", "writing shards").TarWriter(paths[-1], mtime=0.0), 0
        writer.write({"__key__": key, image_ext: image, "txt": caption})
        count += 1
    if writer is not None:
        writer.close()
    return paths
