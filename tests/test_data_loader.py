"""Distributed rank x worker splitting: every sample exactly once per epoch; seeded, reshuffled per epoch."""

import io
from collections import Counter

import pytest
import torch
from PIL import Image

from limoe.data import CsvPairs, ImageConfig, LoaderConfig, WdsPairs, make_loader, write_csv, write_shards
from limoe.data.stream import deal_indices

N = 23  # prime: no world size divides it, so uneven splits are exercised


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    (d / "x.png").write_bytes(tiny_png())
    write_csv(d / "pairs.csv", [("x.png", f"sample {i}") for i in range(N)])
    write_shards([(f"k{i}", tiny_png(), f"sample {i}") for i in range(N)], str(d / "s-%03d.tar"), maxcount=4)
    return {"csv": str(d / "pairs.csv"), "wds": str(d / "s-{000..005}.tar")}


def read_all(kind, path, rank, world, workers, train=True, seed=0, epoch=0):
    kw = dict(image=ImageConfig(image_size=4), train=train, seed=seed, rank=rank, world_size=world)
    ds = CsvPairs(path, **kw) if kind == "csv" else WdsPairs(path, shuffle_buffer=4, **kw)
    loader = make_loader(ds, LoaderConfig(batch_size=3, num_workers=workers))
    loader.epoch = epoch
    return [c for _, caps in loader for c in caps]


# world 2 x 2 workers = 4 readers < 6 shards (whole shards dealt); 3 x 2 = 6 = 6 shards; 4 x 2 = 8 > 6 shards
# (every reader scans all shards and keeps every 8th sample).
@pytest.mark.parametrize("kind", ["csv", "wds"])
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (4, 2)])
def test_every_sample_exactly_once(sources, kind, world, workers):
    seen = Counter()
    for rank in range(world):
        seen.update(read_all(kind, sources[kind], rank, world, workers))
    assert seen == Counter(f"sample {i}" for i in range(N))


def test_shuffle_is_seeded_and_changes_per_epoch(sources):
    a = read_all("csv", sources["csv"], 0, 1, 0, seed=1, epoch=0)
    assert a == read_all("csv", sources["csv"], 0, 1, 0, seed=1, epoch=0)
    assert a != read_all("csv", sources["csv"], 0, 1, 0, seed=1, epoch=1)
    assert a != read_all("csv", sources["csv"], 0, 1, 0, seed=2, epoch=0)
    assert sorted(a) == sorted(read_all("csv", sources["csv"], 0, 1, 0, train=False))


def test_drop_uneven_gives_equal_counts_without_duplicates():
    parts = 4
    shares = [deal_indices(N, p, parts, torch.Generator().manual_seed(0), drop_uneven=True) for p in range(parts)]
    assert {len(s) for s in shares} == {N // parts}
    flat = [i for s in shares for i in s]
    assert len(flat) == len(set(flat)) == N - N % parts
