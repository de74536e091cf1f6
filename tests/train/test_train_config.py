"""TrainConfig: presets, `--set` overrides parsed by field type, clear one-line errors, JSON round trip."""

import json

import pytest

from limoe.cli import main
from limoe.train.config import ConfigError, TrainConfig, apply_overrides, get_preset, load_config, parse_value


def test_overrides_reach_nested_fields_with_their_types():
    cfg = apply_overrides(get_preset("default"), [
        "moe.capacity_factor=1.25", "optim.lr=1e-3", "optim.schedule=rsqrt", "data.batch_size=64",
        "model.width=96", "compile=true", "optim.grad_clip=none", "loss.local_entropy.text=0.05",
        "moe.global_entropy_min_experts=[2,3]", "eval.zero_shot_dir=/data/zs",
    ])
    assert cfg.moe["capacity_factor"] == 1.25 and cfg.optim.lr == 1e-3 and cfg.optim.schedule == "rsqrt"
    assert cfg.data.batch_size == 64 and isinstance(cfg.data.batch_size, int)
    assert cfg.model_args == {"width": 96} and cfg.compile is True and cfg.optim.grad_clip is None
    assert cfg.loss.local_entropy == {"text": 0.05}  # over the router's default: image keeps top_k's 0.01
    assert cfg.resolved().loss.local_entropy == {"image": 0.01, "text": 0.05}
    assert cfg.moe["global_entropy_min_experts"] == (2.0, 3.0)
    model = cfg.model_config()
    assert model.width == 96 and model.moe["capacity_factor"] == 1.25


@pytest.mark.parametrize("item, message", [
    ("optim.lrr=1", "unknown option 'optim.lrr'"),
    ("nosuch=1", "unknown option 'nosuch'"),
    ("moe.capacity=1", "unknown option 'moe.capacity'"),
    ("model.widht=3", "unknown option 'model.widht'"),
    ("optim.lr=fast", "optim.lr: cannot parse 'fast' as float"),
    ("data.batch_size=1.5", "data.batch_size: cannot parse '1.5' as int"),
    ("compile=maybe", "compile: cannot parse 'maybe' as bool"),
    ("steps", "--set expects key=value"),
    ("loss.local_entropy.text=x", "loss.local_entropy.text: cannot parse 'x' as float"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        apply_overrides(get_preset("default"), [item])


@pytest.mark.parametrize("item, message", [
    ("optim.schedule=linear", "optim.schedule must be one of"),
    ("steps=0", "steps must be >= 1"),
    ("data.source=csv", "needs data.train"),
    ("moe.capacity_factor=-1", "moe.capacity_factor must be > 0"),
    ("moe.expert_backend=triton", "moe.expert_backend must be one of"),
    ("moe.k=9", "invalid model config: moe.k must be in"),  # limoe-tiny has 8 experts
    ("optim.accumulation=3", "divisible by optim.accumulation"),
    ("loss.local_entropy.audio=1", r"loss.local_entropy weighs modalities \['audio'\] that moe.modalities"),
])
def test_invalid_values_are_caught_by_validate(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("default"), [item]).validate()


def test_unknown_preset_and_model():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")
    cfg = get_preset("default")
    cfg.model = "limoe-xxl"
    with pytest.raises(ConfigError, match="model must be one of .*got 'limoe-xxl'"):
        cfg.validate()


def test_json_round_trip(tmp_path):
    cfg = apply_overrides(get_preset("quick"), ["moe.capacity_factor=1.5", "optim.beta2=0.95"])
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    again = load_config(str(path))
    assert again == cfg
    data = json.loads(cfg.to_json())
    data["optim"]["nonsense"] = 1
    with pytest.raises(ConfigError, match="nonsense"):
        TrainConfig.from_dict(data)


def test_parse_value_optional_and_tuple():
    assert parse_value("none", int | None) is None
    assert parse_value("3", int | None) == 3
    assert parse_value("1,2", tuple[int, ...]) == (1, 2)


def test_cli_prints_one_line_for_a_bad_override(capsys):
    assert main(["train", "--set", "optim.lr=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["limoe: error: optim.lr: cannot parse 'abc' as float"]
