import pytest

from limoe.model import ModelConfig, get_config, list_models
from limoe.model.config import moe_layer_ids


@pytest.mark.parametrize("rule, depth, expected", [
    ("every:2", 12, (1, 3, 5, 7, 9, 11)),
    ("every:1", 4, (0, 1, 2, 3)),
    ("every:3", 8, (2, 5)),
    ("last:2", 8, (5, 7)),
    ("last:12", 32, tuple(range(9, 32, 2))),
    ("last:0", 8, ()),
    ("none", 8, ()),
    ((3, 1, 3), 8, (1, 3)),
])
def test_placement_rules_follow_vmoe(rule, depth, expected):
    assert moe_layer_ids(rule, depth) == expected


@pytest.mark.parametrize("rule", ["every:0", "last:5", "first:2", "every", (0, 8)])
def test_bad_placement_rules_are_rejected(rule):
    with pytest.raises(ValueError):
        ModelConfig(depth=8, moe_layers=rule)


def test_dense_kind_has_no_moe_layers_whatever_the_rule():
    assert ModelConfig(kind="dense", moe_layers="every:1").moe_layer_ids == ()


def test_overrides_route_moe_options_into_the_moe_dict():
    config = get_config("limoe-tiny", num_experts=6, capacity_factor=2.0, depth=2)
    assert config.moe["num_experts"] == 6 and config.moe["capacity_factor"] == 2.0 and config.depth == 2
    moe = config.moe_config()
    assert (moe.dim, moe.hidden_dim, moe.num_experts) == (config.width, config.mlp_dim, 6)


def test_unknown_options_and_models_fail_loudly():
    with pytest.raises(TypeError):
        get_config("limoe-tiny", not_an_option=1)
    with pytest.raises(ValueError):
        ModelConfig(moe={"dim": 3})
    with pytest.raises(KeyError):
        get_config("limoe-xxl")


def test_registry_lists_every_size_for_every_kind():
    names = set(list_models())
    for kind in ("limoe", "dense", "two-tower"):
        for size in ("s32", "b32", "b16", "l16", "h14", "tiny"):
            assert f"{kind}-{size}" in names
    assert list_models("limoe-") == sorted(n for n in names if n.startswith("limoe-"))
