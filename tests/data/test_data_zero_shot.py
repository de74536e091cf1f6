"""Zero-shot sets by name: built-in CIFAR class names and OpenAI templates, image folders named by class index or
name, webdataset shards in CLIP_benchmark's layout (image + .cls)."""

import re
import warnings

import pytest

from limoe.data import ImageConfig
from limoe.data.benchmarks import CIFAR10, CIFAR100, TEMPLATES
from limoe.data.stats import DataError, DataNotFoundError
from limoe.data.zero_shot import is_shard_pattern, zero_shot_set
from limoe.evaluate import is_template

from _shards import clip_benchmark_shards, png

IMAGE = ImageConfig(image_size=8)


def folder(root, names):
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        (root / name / f"{i}.png").write_bytes(png(i))
    return root


def test_built_in_lists_are_the_datasets_own():
    assert len(CIFAR10) == 10 and CIFAR10[0] == "airplane" and CIFAR10[-1] == "truck"
    # CIFAR-100's fine label names come in alphabetical order in its meta file, underscores for spaces.
    assert len(set(CIFAR100)) == 100 and list(CIFAR100) == sorted(CIFAR100, key=lambda n: n.replace(" ", "_"))
    assert {"aquarium fish", "maple tree", "sweet pepper", "worm"} <= set(CIFAR100)
    assert {name: len(set(t)) for name, t in TEMPLATES.items()} == {"simple": 1, "openai": 80, "openai-cifar": 18}
    assert all(is_template(t) for t in TEMPLATES["openai"] + TEMPLATES["openai-cifar"])
    assert "a blurry photo of the {}." in TEMPLATES["openai-cifar"] and "itap of my {}." in TEMPLATES["openai"]


def test_folders_named_by_index_or_by_name_take_the_built_in_names(tmp_path):
    by_index = zero_shot_set(folder(tmp_path / "a", ["0", "1", "9"]), "cifar10", "openai-cifar", image=IMAGE)
    assert by_index.class_names == ["airplane", "automobile", "truck"] and len(by_index.templates) == 18
    by_name = zero_shot_set(folder(tmp_path / "b", ["aquarium_fish", "Apple"]), "CIFAR100", image=IMAGE)
    assert by_name.class_names == ["apple", "aquarium fish"]  # folders sorted: "Apple" < "aquarium_fish"
    with pytest.raises(DataError, match=r"class folders \['dragon'\] are neither class indices \(0..9\) nor"):
        zero_shot_set(folder(tmp_path / "c", ["cat", "dragon"]), "cifar10", image=IMAGE)
    with pytest.raises(DataNotFoundError, match=r"imagenet1k: no such class-names file, and no built-in one of "
                                                r"that name \(cifar10, cifar100\)"):
        zero_shot_set(tmp_path / "a", "imagenet1k", image=IMAGE)
    # A file of that name wins over the built-in list.
    (tmp_path / "simple").write_text("a drawing of a {c}.\n")  # CLIP_benchmark's placeholder
    assert zero_shot_set(tmp_path / "a", templates=str(tmp_path / "simple"), image=IMAGE).templates == [
        "a drawing of a {}."]


def test_shards_in_clip_benchmark_layout_label_by_index_and_count_bad_labels(tmp_path):
    pattern = clip_benchmark_shards(tmp_path, [(0, b"2"), (1, b"0\n"), (2, b"x"), (3, b"1"), (4, b"7"), (5, None)])
    assert is_shard_pattern(pattern) and not is_shard_pattern(str(tmp_path))
    ds = zero_shot_set(pattern, image=IMAGE)
    assert ds.class_names == ["cat", "dog", "bird"] and ds.templates == ["a photo of a {}.", "a sketch of a {}."]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        items = ds.collect()
    assert [label for _, label in items] == [2, 0, 1] and items[0][0].shape == (3, 8, 8)
    assert ds.skips.totals() == {"bad_label": 2, "incomplete_sample": 1}
    # Names given on the command line win over the file beside the shards.
    assert zero_shot_set(pattern, "cifar10", "simple", image=IMAGE).class_names[:2] == ["airplane", "automobile"]


def test_shards_without_class_names_are_one_line_errors(tmp_path):
    pattern = clip_benchmark_shards(tmp_path, [(0, b"0"), (1, b"1"), (2, b"0"), (3, b"1")])
    (tmp_path / "classnames.txt").unlink()
    with pytest.raises(DataError, match=re.escape("need class names: pass --class-names FILE|cifar10|cifar100, or")) as e:
        zero_shot_set(pattern, image=IMAGE)
    assert "\n" not in str(e.value)
    with pytest.raises(DataNotFoundError, match="no shard file"):
        zero_shot_set(str(tmp_path / "test" / "{0..5}.tar"), "cifar10", image=IMAGE)


def test_training_evaluates_on_the_same_sets(tmp_path):
    from limoe.train.data import eval_sets

    from _train_utils import tiny_config

    cfg = tiny_config(tmp_path)
    cfg.eval.zero_shot_dir = clip_benchmark_shards(tmp_path / "cb", [(0, b"0"), (1, b"1"), (2, b"0"), (3, b"1")])
    cfg.eval.class_names, cfg.eval.templates = "cifar10", "openai"
    _, names, templates = eval_sets(cfg.validate()).zero_shot
    assert names == list(CIFAR10) and len(templates) == 80
    cfg.eval.zero_shot_dir = str(folder(tmp_path / "f", ["thumbs_up", "red_heart"]))
    cfg.eval.class_names = cfg.eval.templates = None  # no classnames.txt: the folder names
    _, names, _ = eval_sets(cfg).zero_shot
    assert names == ["red heart", "thumbs up"]
