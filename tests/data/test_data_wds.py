"""webdataset shards: write/read round trip, brace patterns, bad samples and bad shards, clear errors."""

import json
import tarfile
import warnings

import pytest
from PIL import Image

from limoe.data import ImageConfig, NoValidSamplesError, WdsPairs, write_shards
from limoe.data.wds import expand_shards

from _shards import add, png


def test_round_trip_over_several_shards(tmp_path):
    samples = [(f"s{i:03d}", png(i), f"caption {i}") for i in range(25)]
    paths = write_shards(samples, str(tmp_path / "pairs-%06d.tar"), maxcount=10)
    assert len(paths) == 3
    ds = WdsPairs(str(tmp_path / "pairs-{000000..000002}.tar"), image=ImageConfig(image_size=8))
    items = ds.collect()
    assert [c for _, c in items] == [f"caption {i}" for i in range(25)]  # unshuffled: file order
    assert items[0][0].shape == (3, 8, 8)
    # Shuffled training order is a permutation, and reproducible.
    train = WdsPairs(str(tmp_path / "pairs-*.tar"), train=True, shuffle_buffer=8, seed=3)
    order = [c for _, c in train.collect()]
    assert sorted(order) == sorted(c for *_, c in samples) and order != [c for *_, c in samples]
    assert order == [c for _, c in WdsPairs(str(tmp_path / "pairs-*.tar"), train=True, shuffle_buffer=8, seed=3)]


def test_bad_samples_and_truncated_shard_are_counted(tmp_path):
    shard = tmp_path / "mixed-0.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.png", png(1)); add(tar, "a.txt", b"good text caption")
        add(tar, "b.jpg", png(2)); add(tar, "b.json", json.dumps({"caption": "good json caption"}).encode())
        add(tar, "c.png", png(3))                                        # no caption
        add(tar, "d.txt", b"caption without image")                      # no image
        add(tar, "e.png", b""); add(tar, "e.txt", b"zero-byte image")
        add(tar, "f.png", b"garbage"); add(tar, "f.txt", b"not an image")
        add(tar, "g.png", png(4)); add(tar, "g.txt", b"  \n ")           # whitespace caption
        add(tar, "h.png", png(5)); add(tar, "h.txt", b"\xff\xfe bad utf8")
        add(tar, "i.png", png(6)); add(tar, "i.json", b"{not json")
    # A second shard cut off in the middle of its second sample's image.
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        add(tar, "k.png", png(7)); add(tar, "k.txt", b"before the damage")
        add(tar, "l.png", bytes(Image.effect_noise((64, 64), 40).tobytes())); add(tar, "l.txt", b"lost")
    data = whole.read_bytes()
    (tmp_path / "mixed-1.tar").write_bytes(data[: 512 * 4 + 1000])
    ds = WdsPairs(str(tmp_path / "mixed-{0..1}.tar"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = sorted(c for _, c in ds.collect())
    assert captions == ["before the damage", "good json caption", "good text caption"]
    assert ds.skips.totals() == {"incomplete_sample": 2, "empty_file": 1, "not_an_image": 1,
                                 "empty_caption": 1, "bad_encoding": 2, "bad_shard": 1}
    assert len(caught) == 1 and "skipped 8" in str(caught[0].message)


def test_pattern_errors_name_the_pattern(tmp_path):
    write_shards([("a", png(0), "x")], str(tmp_path / "ok-%02d.tar"))
    with pytest.raises(ValueError, match=r"malformed shard pattern .*ok-\{00\.\.01\.tar.*unbalanced"):
        expand_shards(str(tmp_path / "ok-{00..01.tar"))
    with pytest.raises(FileNotFoundError, match=r"ok-01\.tar"):
        expand_shards(str(tmp_path / "ok-{00..01}.tar"))
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        WdsPairs(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="empty"):
        expand_shards("  ")
    # '::' joins several patterns.
    assert len(expand_shards(f"{tmp_path}/ok-00.tar::{tmp_path}/ok-{{00..00}}.tar")) == 2


def test_shards_without_valid_samples_raise(tmp_path):
    shard = tmp_path / "empty-0.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.txt", b"only captions here")
    with pytest.raises(NoValidSamplesError, match="empty-0.tar"):
        WdsPairs(str(shard)).collect()
