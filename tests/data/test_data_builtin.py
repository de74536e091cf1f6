"""The built-in OpenMoji dataset: concept grouping, honest splits, deterministic build, zero-shot view."""

import hashlib
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from limoe.data import (BuiltinConfig, LoaderConfig, build_builtin_dataset, builtin_concepts, builtin_zero_shot,
                        load_builtin, make_loader)
from limoe.data.builtin import plan
from limoe.data.concepts import codepoint_key, group_concepts, name_key

SMALL = 40  # concept groups in the test builds: ~100 images, under a second


def tree_digest(root) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            if f != "manifest.json":  # holds the build time
                h.update(open(p, "rb").read())
    return h.hexdigest()


def test_variants_of_one_concept_are_grouped():
    items = [
        ((0x1F44D,), "thumbs up"),
        ((0x1F44D, 0x1F3FD), "thumbs up, medium skin tone"),
        ((0x1F468, 0x200D, 0x1F692), "man firefighter"),
        ((0x1F469, 0x1F3FF, 0x200D, 0x1F692), "woman firefighter, dark skin tone"),
        ((0x1F9D1, 0x200D, 0x1F692), "firefighter"),
        ((0x1F3C3, 0x200D, 0x2640, 0xFE0F), "woman running"),
        ((0x1F3C3,), "person running"),
        ((0x1F618,), "face blowing a kiss"),
        ((0x1F48F,), "kiss"),
        ((0x1F469, 0x200D, 0x2764, 0xFE0F, 0x200D, 0x1F48B, 0x200D, 0x1F468), "kiss woman man"),
        ((0x1F3FD,), "medium skin tone"),
    ]
    g = group_concepts(items)
    assert g[0] == g[1] and g[2] == g[3] == g[4] and g[5] == g[6] and g[8] == g[9]
    assert len({g[0], g[2], g[5], g[7], g[8], g[10]}) == 6  # distinct concepts stay apart
    assert name_key("man firefighter, light skin tone") == "firefighter"
    assert codepoint_key((0x1F3FD,)) == "1F3FD"  # a modifier alone is its own concept


def test_full_split_shares_no_concept_or_variant_key():
    """On the real emoji list (no rendering): no train emoji shares a variant key with a test emoji."""
    p = plan(BuiltinConfig())
    assert len(p.emoji) > 3500 and len(p.names) > 1500
    assert 0.1 < len(p.test) / len(p.names) < 0.3
    test_keys, train_keys = set(), set()
    for e, concept in zip(p.emoji, p.concept):
        keys = {"cp:" + codepoint_key(e.codepoints), "name:" + name_key(e.name)} - {"name:"}
        (test_keys if concept in p.test else train_keys).update(keys)
    assert not test_keys & train_keys


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = BuiltinConfig(max_concepts=SMALL, cache_dir=str(tmp_path_factory.mktemp("cache")), test_fraction=0.3)
    return cfg, build_builtin_dataset(cfg, quiet=True)


def test_build_is_deterministic_and_cached(small, tmp_path, capsys):
    cfg, root = small
    other = BuiltinConfig(max_concepts=SMALL, cache_dir=str(tmp_path), test_fraction=0.3, workers=1)
    again = build_builtin_dataset(other)
    assert "building the built-in OpenMoji dataset" in capsys.readouterr().err  # a clear message
    assert tree_digest(root) == tree_digest(again)
    assert build_builtin_dataset(other) == again  # second call: from the cache, silent
    assert capsys.readouterr().err == ""


def test_splits_share_no_concept_and_zero_shot_view_matches(small):
    cfg, root = small
    train_c, test_c = builtin_concepts("train", cfg), builtin_concepts("test", cfg)
    assert train_c and test_c
    assert not set(train_c) & set(test_c)
    assert len(set(train_c) | set(test_c)) == SMALL

    zs, class_names, templates = builtin_zero_shot(image_size=32, cfg=cfg)
    assert len(class_names) == len(set(test_c)) == len(set(class_names))
    assert all("{}" in t for t in templates)
    x_B3HW, y_B = next(iter(make_loader(zs, LoaderConfig(batch_size=1000, num_workers=0))))
    assert x_B3HW.shape == (len(test_c), 3, 32, 32)
    # Each class folder holds exactly the test images of one concept.
    assert sorted(Counter(y_B.tolist()).values()) == sorted(Counter(test_c).values())


def test_load_builtin_gives_image_caption_pairs(small):
    cfg, _ = small
    train = load_builtin("train", image_size=24, cfg=cfg)
    x_3HW, caption = next(iter(train))
    assert x_3HW.shape == (3, 24, 24) and x_3HW.dtype == torch.float32
    assert isinstance(caption, str) and caption.strip() == caption and caption
    test = load_builtin("test", image_size=24, cfg=cfg)
    assert len(test.collect()) == len(builtin_concepts("test", cfg))  # every render decodes
    with pytest.raises(ValueError, match="'val'"):
        load_builtin("val", cfg=cfg)


@pytest.mark.slow
def test_full_build(tmp_path):
    import json
    import time

    t0 = time.perf_counter()
    root = build_builtin_dataset(BuiltinConfig(cache_dir=str(tmp_path)), quiet=True)
    assert time.perf_counter() - t0 < 60
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["pairs"]["train"] > 2500 and manifest["pairs"]["test"] > 400
    train_c = set(builtin_concepts("train", BuiltinConfig(cache_dir=str(tmp_path))))
    test_c = set(builtin_concepts("test", BuiltinConfig(cache_dir=str(tmp_path))))
    assert not train_c & test_c


def test_extra_style_follows_the_builtin_split(small, tmp_path):
    import io

    from PIL import Image

    from limoe.data import CsvPairs
    from limoe.data.styles import build_style, parse_codepoints

    cfg, root = small
    assert parse_codepoints("emoji_u1f44d_1f3fd") == (0x1F44D, 0x1F3FD)
    assert parse_codepoints("1F1E9-1F1FF") == (0x1F1E9, 0x1F1FF)
    assert parse_codepoints("readme") is None
    p = plan(cfg)
    style_dir = tmp_path / "other_style"
    style_dir.mkdir()
    for e in p.emoji:  # a fake "style": one flat-colour PNG per emoji, named the Noto way
        buf = io.BytesIO()
        Image.new("RGBA", (16, 16), (200, 100, 0, 255)).save(buf, format="PNG")
        stem = "emoji_u" + "_".join(f"{c:x}" for c in e.codepoints if c != 0xFE0F)
        (style_dir / f"{stem}.png").write_bytes(buf.getvalue())
    (style_dir / "LICENSE.txt").write_text("not an emoji")
    counts = build_style(style_dir, "flat", cfg)
    assert counts == {"train": len(builtin_concepts("train", cfg)), "test": len(builtin_concepts("test", cfg)),
                      "unmatched": 1}
    test_pairs = CsvPairs(root / "styles" / "flat" / "test.csv").collect()
    assert sorted(c for _, c in test_pairs) == sorted(
        e.name for e, c in zip(p.emoji, p.concept) if c in p.test)


def test_tests_use_a_temporary_cache_not_the_users():
    from limoe.data.builtin import cache_root

    home_cache = Path(os.path.expanduser("~")) / ".cache" / "limoe"
    assert cache_root() != home_cache and str(cache_root()).startswith(tempfile.gettempdir())
