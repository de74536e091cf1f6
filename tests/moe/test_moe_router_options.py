"""Which routing options each router reads (ROUTER_OPTIONS): an option the chosen router ignores is refused when
set, dropped when a preset brought it, and dropped from model.json files saved before the rule."""

from __future__ import annotations

import dataclasses
import json

import pytest

from limoe.checkpoint.format import read_model_config
from limoe.checks import ConfigError
from limoe.model.registry import get_config
from limoe.moe import MoeConfig
from limoe.moe.config import ROUTER_OPTIONS, unread_options
from limoe.moe.routers import ROUTERS

SET = {"k": 2, "batch_priority": False, "noise_std": 0.5, "capacity_factor": 2.0, "eval_capacity_factor": 3.0,
       "capacity_rounding": "round", "capacity_multiple_of": 1, "capacity_tokens": "valid", "slots_per_expert": 3,
       "soft_init": "unit_columns"}  # a value other than the default for every routing option


def _config(router: str, **kwargs) -> MoeConfig:
    slots = {"slots_per_expert": 2} if router == "soft" else {}
    return MoeConfig(8, 16, num_experts=4, router=router, **{**slots, **kwargs})


def test_every_routing_option_is_read_by_some_router_and_has_a_test_value():
    named = {key for keys in ROUTER_OPTIONS.values() for key in keys}
    assert named == set(SET)
    assert set(ROUTER_OPTIONS) == set(ROUTERS)  # a new router declares what it reads
    assert unread_options("top_k") == ("slots_per_expert", "soft_init")
    assert set(unread_options("soft")) == {"k", "batch_priority", "noise_std", "eval_capacity_factor",
                                           "capacity_tokens"}
    assert unread_options("no such router") == ()  # MoeConfig reports the unknown router itself


@pytest.mark.parametrize("router", list(ROUTER_OPTIONS))
def test_an_option_the_router_ignores_is_refused_and_one_it_reads_is_taken(router):
    for key, value in SET.items():
        if key in ROUTER_OPTIONS[router]:
            assert getattr(_config(router, **{key: value}), key) == value
        else:
            with pytest.raises(ConfigError) as err:
                _config(router, **{key: value})
            message = str(err.value)
            assert "\n" not in message and f"moe.{key}=" in message and repr(router) in message


def test_choosing_a_router_drops_the_preset_options_it_ignores_but_not_the_users():
    preset = get_config("limoe-tiny")
    assert preset.moe["eval_capacity_factor"] == 2.0  # the preset's, read by top_k
    soft = get_config("limoe-tiny", router="soft")
    assert "eval_capacity_factor" not in soft.moe and soft.moe_config().slots_per_expert == 2
    ec = get_config("limoe-tiny", router="expert_choice")
    assert ec.moe["eval_capacity_factor"] == 2.0  # Expert Choice reads it: kept
    with pytest.raises(ConfigError, match="eval_capacity_factor=3.0 does nothing with moe.router='soft'"):
        get_config("limoe-tiny", router="soft", eval_capacity_factor=3.0).moe_config()


def test_a_model_json_saved_with_an_ignored_option_still_loads(tmp_path):
    base = get_config("limoe-tiny")
    old = dataclasses.replace(base, moe={**base.moe, "router": "soft", "noise_std": 0.0, "batch_priority": False})
    (tmp_path / "model.json").write_text(json.dumps(dataclasses.asdict(old)))
    loaded = read_model_config(tmp_path)
    assert loaded.moe == {"num_experts": 8, "group_size": 8, "router": "soft"}
    assert loaded.moe_config().router == "soft"
