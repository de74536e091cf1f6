"""Distributed rank x worker splitting: every sample exactly once per epoch; seeded, reshuffled per epoch."""

import io
import os
import signal
import subprocess
import sys
import time
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


WORKER_SCRIPT = """
import os, sys, time
from limoe.data import CsvPairs, ImageConfig, LoaderConfig, make_loader, write_csv
d = sys.argv[1]
with open(os.path.join(d, "x.png"), "wb") as f:
    f.write(bytes.fromhex(sys.argv[2]))
# Long captions: a few batches fill the pipe to the parent, so the workers block writing once it stops reading.
write_csv(os.path.join(d, "long.csv"), [("x.png", "word " * 100_000 + str(i)) for i in range(64)])
ds = CsvPairs(os.path.join(d, "long.csv"), image=ImageConfig(image_size=4))
it = iter(make_loader(ds, LoaderConfig(batch_size=4, num_workers=2, prefetch_factor=4)))
next(it)
me = str(os.getpid())
def ppid(p):
    with open(f"/proc/{p}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[1]
kids = [p for p in os.listdir("/proc") if p.isdigit() and ppid(p) == me]
print(" ".join(kids), flush=True)
time.sleep(120)
"""


def alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (nobody reaped it yet)
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux-only")
def test_workers_die_with_a_killed_trainer(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path), tiny_png().hex()],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        workers = proc.stdout.readline().split()
        assert len(workers) == 2 and all(alive(p) for p in workers)
        time.sleep(1.0)  # the workers run ahead and block on the full pipe
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # DataLoader's own watchdog polls every 5 s and cannot help a worker blocked in a write at all.
        deadline = time.monotonic() + 3.0
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in workers)
    finally:
        proc.kill()
