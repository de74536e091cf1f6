"""Unicode subcategories of the built-in emoji, and the few-shot probe set built from them."""

import math
from pathlib import Path

import pytest
import torch

from limoe.data import builtin_concepts
from limoe.data.categories import builtin_category_probe, subcategory_of


@pytest.mark.parametrize("stem, expected", [
    ("1F992", "animal-mammal"),          # giraffe
    ("1F34E", "food-fruit"),             # red apple
    ("2764-FE0F", "heart"),              # red heart, with the presentation selector
    ("2764", "heart"),                   # ... and without it
    ("1F44D-1F3FD", "hand-fingers-closed"),  # thumbs up, medium skin tone: a skin variation
    ("E000", None),                      # private use: not a Unicode emoji
])
def test_subcategory_of(stem, expected):
    assert subcategory_of(stem) == expected


def test_probe_set_has_one_plain_image_per_concept_and_big_enough_classes():
    paths, labels, names = builtin_category_probe(min_concepts=11)
    assert len(paths) == len(labels) and len(set(paths)) == len(paths)
    assert len(names) >= 20 and "animal-mammal" in names and "country-flag" in names
    counts = torch.bincount(torch.tensor(labels))
    assert int(counts.min()) >= 11
    for path, label in zip(paths, labels):
        assert subcategory_of(Path(path).stem) == names[label]
        assert Path(path).is_file()
    # One image per concept: no two images of one concept (e.g. skin-tone variants) can be a shot and a test.
    assert len(paths) <= len(set(builtin_concepts("train"))) + len(set(builtin_concepts("test")))
    assert not any("1F3FB" in Path(p).stem or "1F3FF" in Path(p).stem for p in paths)  # plainest variants


def test_probe_metrics_of_an_untrained_model_are_finite_rates():
    from limoe.reproduce import SCALES, plan_jobs
    from limoe.model.registry import build_model
    from limoe.reproduce.metrics import probe_metrics

    cfg = next(j for j in plan_jobs(SCALES["cpu"], seeds=(0,)) if j.variant.name == "dense").config("")
    torch.manual_seed(0)
    model = build_model(cfg.model_config()).eval()
    got = probe_metrics(model, cfg)
    for value in got.values():
        assert not math.isnan(value) and 0 < value < 1
    assert got == probe_metrics(model, cfg)  # the shot draws are seeded
