"""Config validation: every option of a training config (sections, loss, model.* and moe.* overrides) is checked for
type and range, and every failure is one ConfigError line naming the dotted key.

The option walk is generated from the dataclass fields, so a new field without a declared check fails here (and a
new field with one is walked with bad values automatically).
"""

import json
import math
import typing
from dataclasses import fields, is_dataclass
from functools import reduce

import pytest
import torch

from limoe.checks import Check, dotted
from limoe.cli import main
from limoe.model.config import MOE_KEYS, ModelConfig
from limoe.moe.layer import MoeConfig
from limoe.train.config import ConfigError, TrainConfig, apply_overrides, get_preset, load_config


def declared_checks(cls, prefix: str = "") -> dict[str, Check | None]:
    """Dotted key -> declared check (None: none declared) of every option under `cls`: sections are walked, keyed
    dicts (model.*, moe.*) contribute their keys."""
    checks = {}
    for f in fields(cls):
        check, key = f.metadata.get("check"), prefix + f.metadata.get("key", f.name)
        if check is None:
            checks[key] = None
            continue
        if is_dataclass(check.kinds[0]):
            checks.update(declared_checks(check.kinds[0], f"{key}."))
        elif check.keys is not None:
            checks.update({f"{key}.{name}": c for name, c in check.keys.items()})
        else:
            checks[key] = check
    return checks


def dotted_fields(cls, prefix: str = "") -> set[str]:
    """Every option users can set, from the dataclasses alone (not from the checks)."""
    hints, keys = typing.get_type_hints(cls), set()
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            keys |= dotted_fields(hints[f.name], f"{prefix}{f.name}.")
        elif cls is TrainConfig and f.name == "model_args":
            keys |= {f"model.{g.name}" for g in fields(ModelConfig) if g.name != "moe"}
        elif cls is TrainConfig and f.name == "moe":
            keys |= {f"moe.{name}" for name in MOE_KEYS}
        else:
            keys.add(prefix + f.name)
    return keys


CHECKS = declared_checks(TrainConfig)
# The test's own idea of each type (not the implementation's): ints are fine as floats, bools are not numbers.
ACCEPTS = {int: lambda v: type(v) is int, float: lambda v: type(v) in (int, float), bool: lambda v: type(v) is bool,
           str: lambda v: type(v) is str, dict: lambda v: type(v) is dict, tuple: lambda v: type(v) in (tuple, list)}
CANDIDATES = ("abc", 1.5, True, 3, ("x",), {"x": 1})


def bad_values(check: Check) -> list[tuple[object, str]]:
    """(value, "type" or "value") pairs: a wrong type always, None where it is not allowed; out-of-range,
    non-finite and unknown-name values where the check has a range, floats or names."""
    values = [(v, "type") for v in CANDIDATES if not any(ACCEPTS[k](v) for k in check.kinds)]
    if not check.none:
        values.append((None, "type"))
    step = 1 if check.kinds == (int,) else 0.5
    values += [(b, "value") for b in (None if check.ge is None else check.ge - step, check.gt,
                                      None if check.le is None else check.le + step, check.lt) if b is not None]
    if float in check.kinds:
        values += [(v, "value") for v in (math.nan, math.inf, -math.inf, 1e40)]
    if check.choices:
        values.append(("no-such-name", "value"))
    if check.item is not None:  # a list / dict holding one bad element
        wrap = (lambda v: {"image": v}) if dict in check.kinds else (lambda v: (v,))
        values += [(wrap(v), why) for v, why in bad_values(check.item)]
    return values


KEYS = sorted(key for key, check in CHECKS.items() if check)


def assign(cfg: TrainConfig, key: str, value) -> None:
    *path, name = key.split(".")
    if path in (["model"], ["moe"]):
        (cfg.model_args if path == ["model"] else cfg.moe)[name] = value
    else:
        setattr(reduce(getattr, path, cfg), name, value)


def one_line_error(call, key: str) -> str:
    with pytest.raises(ConfigError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and key in message, message
    return message


def test_every_option_declares_its_check():
    assert [key for key, check in CHECKS.items() if check is None] == []
    assert set(CHECKS) == dotted_fields(TrainConfig)
    for cls in (ModelConfig, MoeConfig):
        assert all("check" in f.metadata for f in fields(cls)), cls


@pytest.mark.parametrize("key", KEYS)
def test_every_bad_value_is_one_line_naming_the_key(key):
    for value, _ in bad_values(CHECKS[key]):
        cfg = get_preset("default")
        assign(cfg, key, value)
        one_line_error(cfg.validate, key)


@pytest.mark.parametrize("section", ["data", "optim", "loss", "eval", "dist"])
def test_a_section_of_the_wrong_type_is_named(section):
    cfg = get_preset("default")
    setattr(cfg, section, 3)
    one_line_error(cfg.validate, section)
    data = get_preset("default").to_dict()
    data[section] = 3
    assert "expected a dict" in one_line_error(lambda: TrainConfig.from_dict(data), section)


@pytest.mark.parametrize("key", KEYS)
def test_a_config_file_with_a_wrong_type_is_one_line_naming_the_key(key):
    *path, name = key.split(".")
    path = ["model_args"] if path == ["model"] else path
    for value, why in bad_values(CHECKS[key]):
        if why != "type":
            continue  # right type, bad value: validate's job (the config of a finished run must still load)
        data = get_preset("default").to_dict()
        reduce(lambda d, part: d.setdefault(part, {}), path, data)[name] = value
        one_line_error(lambda: TrainConfig.from_dict(data), key)


@pytest.mark.parametrize("cls", [ModelConfig, MoeConfig])
def test_model_and_moe_configs_check_each_field_when_built(cls):
    required = {"dim": 12, "hidden_dim": 20} if cls is MoeConfig else {}
    for f in fields(cls):
        for value, _ in bad_values(f.metadata["check"]):
            with pytest.raises(ValueError, match=f.name):
                cls(**{**required, f.name: value})


# -- the cases the issue measured ----------------------------------------------------------------------------
@pytest.mark.parametrize("item, message", [
    ("loss.contrastive=hinge", "loss.contrastive must be one of ('softmax', 'sigmoid'), got 'hinge'"),
    ("optim.grad_clip=-1", "optim.grad_clip must be > 0 or None, got -1.0"),
    ("optim.min_lr_ratio=-5", "optim.min_lr_ratio must be in [0, 1], got -5.0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("log_interval=0", "log_interval must be >= 1, got 0"),
    ("optim.accumulation=0", "optim.accumulation must be >= 1, got 0"),
    ("optim.beta1=1.5", "optim.beta1 must be in [0, 1), got 1.5"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1.0"),
    ("optim.eps=-1", "optim.eps must be > 0, got -1.0"),
    ("threads=-1", "threads must be >= 1 or None, got -1"),
    ("optim.lr=1e40", "optim.lr must be a finite number within float32 range, got 1e+40"),
    ("data.crop_scale=2", "data.crop_scale must be in (0, 1], got 2.0"),
    ("data.jitter=-1", "data.jitter must be in [0, 1), got -1.0"),
    ("eval.interval=-1", "eval.interval must be >= 0, got -1"),
    ('loss.local_entropy={"image":0.01,"txt":0.01}',
     "loss.local_entropy weighs modalities ['txt'] that moe.modalities ('image', 'text') does not have"),
    ("moe.num_experts=-1", "moe.num_experts must be >= 1, got -1"),
    ("model.width=0", "model.width must be >= 1, got 0"),
    ("moe.capacity_factor=nan", "moe.capacity_factor must be a finite number within float32 range, got nan"),
    ("device=tpu", "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
])
def test_measured_bad_values_are_refused(item, message):
    cfg = apply_overrides(get_preset("default"), [item])
    assert one_line_error(cfg.validate, item.partition("=")[0]) == message


@pytest.fixture
def cuda_devices(monkeypatch):
    """Pretend this machine has `n` CUDA devices, whatever it really has."""
    def pretend(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return pretend


def test_device_must_be_available(cuda_devices):
    cuda_devices(0)
    for device in ("cuda", "cuda:0"):
        assert "finds no CUDA device" in one_line_error(apply_overrides(get_preset("default"), [
            f"device={device}"]).validate, "device")
    cuda_devices(2)
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        apply_overrides(get_preset("default"), [f"device={device}"]).validate()
    assert "only 2 CUDA device(s)" in one_line_error(
        apply_overrides(get_preset("default"), ["device=cuda:2"]).validate, "device")
    for device in ("cuda:x", "cuda:-1", "gpu", ""):
        one_line_error(apply_overrides(get_preset("default"), [f"device={device}"]).validate, "device")


@pytest.mark.parametrize("data, message", [
    ({"steps": "abc"}, "steps: expected an int, got 'abc'"),
    ({"steps": True}, "steps: expected an int, got True"),
    ({"optim": 3}, "optim: expected a dict of OptimConfig options, got 3"),
    ({"optim": {"lr": "abc"}}, "optim.lr: expected a float, got 'abc'"),
    ({"data": {"batch_size": 1.5}}, "data.batch_size: expected an int, got 1.5"),
    ({"data": {"source": ["csv"]}}, "data.source: expected a str, got ['csv']"),
    ({"run_dir": None}, "run_dir: expected a str, got None"),
    ({"model_args": {"width": "96"}}, "model.width: expected an int, got '96'"),
    ({"model_args": {"widht": 96}}, "unknown option 'model.widht'"),
    ({"moe": {"num_experts": 2.0}}, "moe.num_experts: expected an int, got 2.0"),
    ({"loss": {"contrastive": "hinge"}}, "loss.contrastive must be one of ('softmax', 'sigmoid'), got 'hinge'"),
    ({"loss": {"local_entropy": {"text": "x"}}}, "loss.local_entropy.text: expected a float, got 'x'"),
])
def test_config_files_with_wrong_types_are_one_line(data, message):
    assert one_line_error(lambda: TrainConfig.from_dict(data), "").startswith(message)


def test_config_file_values_are_checked_by_validate_not_load(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"optim": {"beta1": 1.5, "lr": 1}}))
    cfg = load_config(str(path))  # a run's saved config loads (e.g. to evaluate it elsewhere) ...
    assert cfg.optim.lr == 1
    one_line_error(cfg.validate, "optim.beta1")  # ... and training with it is refused
    path.write_text("[1, 2]")
    one_line_error(lambda: load_config(str(path)), "config")


# -- what must stay accepted ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["default", "quick", "limoe-b16"])
def test_presets_validate(preset):
    get_preset(preset).validate()


@pytest.mark.parametrize("item", [
    "optim.grad_clip=none", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1", "threads=none", "optim.beta1=0",
    "optim.weight_decay=0", "optim.warmup_steps=0", "optim.rsqrt_timescale=1", "optim.lr=1", "data.jitter=0",
    "data.crop_scale=1", "data.num_workers=0", "data.max_concepts=1", "eval.interval=0", "checkpoint_interval=0",
    "debug_nan_at_step=0", "loss.z=0", "loss.contrastive=sigmoid", "moe.noise_std=0", "moe.group_size=none",
    "moe.eval_capacity_factor=none", "model.embed_dim=none", "model.logit_bias_init=-10", "device=cpu",
    "seed=0", "run_dir=", "data.cache_dir=none", "model=dense-tiny",
])
def test_valid_edge_values_are_accepted(item):
    apply_overrides(get_preset("default"), [item]).validate()


def test_ints_are_floats_in_a_config_file():
    data = get_preset("default").to_dict()
    data["optim"].update(lr=1, grad_clip=2, min_lr_ratio=0)
    data["moe"] = {"capacity_factor": 2}
    TrainConfig.from_dict(data).validate()


def test_cli_refuses_a_bad_value_in_one_line_before_writing_anything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--set", "optim.beta1=1.5", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("limoe: error: optim.beta1 must be in [0, 1)"), err
    assert not run_dir.exists()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"steps": "abc"}))
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["limoe: error: steps: expected an int, got 'abc'"]
    assert not run_dir.exists()


def test_cli_refuses_an_unavailable_device_in_one_line(tmp_path, capsys, cuda_devices):
    cuda_devices(0)
    assert main(["train", "--device", "cuda", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("limoe: error: device is 'cuda' but"), err
    assert not (tmp_path / "run").exists()


# -- checks across fields name the keys users type (moe.k), not the bare fields (k) ------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["moe.k=9"], "moe.k must be in [1, moe.num_experts=8], got 9"),
    (["model.heads=5"], "model.width=64 must be divisible by model.heads=5"),
    (["data.image_size=30"], "data.image_size=30 must be divisible by model.patch_size=8"),
    (["model.image_size=30"], "model.image_size=30 must be divisible by model.patch_size=8"),
    (["moe.global_entropy_min_experts=[9,1]"], "moe.global_entropy_min_experts values must be in [1, "
                                               "moe.num_experts=8]"),
])
def test_cross_field_errors_name_the_keys_users_type(overrides, message):
    cfg = get_preset("default")
    apply_overrides(cfg, overrides)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert message in str(e.value)


def test_dotted_names_bare_fields_only():
    keys = {"k": "moe.k", "num_experts": "moe.num_experts", "depth": "model.depth"}
    assert dotted("k must be in [1, num_experts=4], got 9", keys) == "moe.k must be in [1, moe.num_experts=4], got 9"
    assert dotted("moe.k=2 ...: leave k at 1", keys) == "moe.k=2 ...: leave moe.k at 1"  # dotted already: kept
    assert dotted("'every:n' (n <= depth // 2), keys 'k'", keys) == "'every:n' (n <= model.depth // 2), keys 'k'"
