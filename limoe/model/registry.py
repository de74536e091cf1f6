"""Named presets: `list_models("*b16*")`, `get_config("limoe-b16", **overrides)`, `build_model(config)`,
`get_model_info`. `limoe.create_model` (limoe/factory.py) builds a preset or a trained model from these.

Sizes are the ViT ones (Dosovitskiy et al. 2021: S, B, L, H). MoE settings of the LIMoE presets (K = 1 throughout):
- S/32: E = 8 in every other block (the design default).
- B/32, B/16, L/16: E = 8 in every block. The paper reports B/16 at ~0.5B total / ~0.1B per token and L/16 at
  1.7B / 0.3B; every-other-block with E = 8 would give only 0.31B / 1.0B, while E = 8 everywhere gives 0.52B and
  1.77B (exact numbers: `get_model_info`). The paper's own layout is not known to us; override if needed.
- H/14: E = 32 in the last 12 odd blocks ("fits 32 experts in 12 MoE layers"): 5.6B total / 0.71B per token.
- Routing groups: 8 examples per group (`group_size`), joint in training (a pair's patches and text tokens share
  a group and its capacity). V-MoE's paper configs route groups of 8 images (the smallest batch per device);
  LIMoE's example is a pair, so a B/16 group holds 8 x (196 + 16) = 1,696 tokens. 8 is also the smallest group
  in which every expert of E = 8 can get a capacity that is not mostly rounding.
Dense and two-tower presets share the sizes; two-tower towers are both full-size (same FLOPs per token).
The tiny presets train in minutes on 2 CPU cores (32 px images, 16 patches, 4 blocks of width 64).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable

from limoe.model.base import ContrastiveModel
from limoe.model.config import MOE_KEYS, ModelConfig
from limoe.model.flops import ModelInfo, model_info
from limoe.model.one_tower import OneTower
from limoe.model.two_tower import TwoTower
from limoe.moe.config import ROUTER_PAPER_DEFAULTS, without_unread_options

# name: (width, depth, mlp_dim, heads)
_SIZES = {"s": (512, 8, 2048, 8), "b": (768, 12, 3072, 12), "l": (1024, 24, 4096, 16), "h": (1280, 32, 5120, 16)}
_VARIANTS = {"s32": ("s", 32), "b32": ("b", 32), "b16": ("b", 16), "l16": ("l", 16), "h14": ("h", 14)}
_LIMOE_MOE = {"s": ("every:2", 8), "b": ("every:1", 8), "l": ("every:1", 8), "h": ("last:12", 32)}
_KINDS = {"limoe": "limoe", "dense": "dense", "two-tower": "two_tower"}
GROUP_SIZE = 8  # examples (pairs in training) per routing group

# Chosen by the default run's sweep (docs/training.md): mean pooling, not the MAP head, which at this width learns
# slowly; 8 experts, not 4 (the same compute per token, more parameters); an evaluation capacity factor of 2, as at
# training's 1.0 first-choice drops cost about 3 points of seen-concept top-1.
_TINY = dict(width=64, depth=4, heads=4, mlp_dim=256, patch_size=8, image_size=32, vocab_size=8192,
             context_length=16, moe_layers="every:2", image_pool="mean", text_pool="mean",
             moe={"num_experts": 8, "group_size": GROUP_SIZE, "eval_capacity_factor": 2.0})


def _preset(prefix: str, variant: str) -> ModelConfig:
    kind = _KINDS[prefix]
    if variant == "tiny":
        return ModelConfig(kind=kind, **{**_TINY, "moe_layers": _TINY["moe_layers"] if kind != "two_tower" else "none"})
    size, patch = _VARIANTS[variant]
    width, depth, mlp_dim, heads = _SIZES[size]
    layers, experts = _LIMOE_MOE[size] if kind == "limoe" else ("none", 8)
    return ModelConfig(kind=kind, width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=patch,
                       image_size=224, moe_layers=layers, moe={"num_experts": experts, "group_size": GROUP_SIZE})


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    f"{prefix}-{variant}": (lambda p=prefix, v=variant: _preset(p, v))
    for prefix in _KINDS for variant in (*_VARIANTS, "tiny")
}


def list_models(pattern: str = "") -> list[str]:
    """Preset names matching `pattern`: a shell-style wildcard ("*b16*", "limoe-*"), else a prefix ("limoe-")."""
    if any(ch in pattern for ch in "*?["):
        return sorted(name for name in _PRESETS if fnmatch.fnmatchcase(name, pattern.lower()))
    return sorted(name for name in _PRESETS if name.startswith(pattern))


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's config with `overrides`; MoeConfig options (num_experts, k, ...) go into `config.moe`."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model {name!r}; known: {list_models()}")
    return with_overrides(_PRESETS[name](), **overrides)


def with_overrides(config: ModelConfig, **overrides: Any) -> ModelConfig:
    """`config` with `overrides`; a router chosen here brings its paper's settings (ROUTER_PAPER_DEFAULTS) for
    the MoE keys the overrides leave unset, over the preset's, and drops the preset's options it does not read
    (ROUTER_OPTIONS; the overrides' own are kept, and refused by MoeConfig)."""
    moe_overrides = {**overrides.pop("moe", {})}
    moe_overrides.update({key: overrides.pop(key) for key in list(overrides) if key in MOE_KEYS})
    paper = ROUTER_PAPER_DEFAULTS.get(moe_overrides.get("router"), {})
    moe = without_unread_options({**config.moe, **paper, **moe_overrides}, keep=moe_overrides)
    return dataclasses.replace(config, moe=moe, **overrides)


def build_model(config: ModelConfig) -> ContrastiveModel:
    return TwoTower(config) if config.kind == "two_tower" else OneTower(config)


def get_model_info(name_or_config: str | ModelConfig, **overrides: Any) -> ModelInfo:
    """Analytic total / active parameters and forward FLOPs of a preset or config."""
    config = get_config(name_or_config, **overrides) if isinstance(name_or_config, str) else name_or_config
    return model_info(config)
