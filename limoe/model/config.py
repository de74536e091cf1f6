"""ModelConfig: everything that defines a one-tower (LIMoE / dense) or two-tower contrastive model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from limoe.moe.layer import MoeConfig

KINDS = ("limoe", "dense", "two_tower")
POOLINGS = ("map", "mean", "last")
# MoeConfig fields a ModelConfig may set; dim and hidden_dim always come from width and mlp_dim.
MOE_KEYS = tuple(f.name for f in fields(MoeConfig) if f.name not in ("dim", "hidden_dim"))


@dataclass
class ModelConfig:
    kind: str = "limoe"
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    image_size: int = 224
    in_channels: int = 3
    vocab_size: int = 32_000
    context_length: int = 16  # fixed text length of the authors' setups
    pad_id: int = 0
    embed_dim: int | None = None  # shared embedding space; None: width
    image_pool: str = "map"
    text_pool: str = "map"
    # MoE placement: "every:n" (blocks n-1, 2n-1, ...), "last:n" (the last n odd blocks), "none", or block ids.
    moe_layers: str | tuple[int, ...] = "every:2"
    moe: dict[str, Any] = field(default_factory=dict)  # MoeConfig keyword arguments (num_experts, k, ...)
    temperature_init: float = math.log(10.0)  # learned log logit scale
    max_logit_scale: float = 100.0  # CLIP's clamp: keeps the softmax from becoming a hard argmax
    logit_bias_init: float | None = None  # SigLIP's learned bias (e.g. -10); None: no bias parameter
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("width", "depth", "heads", "mlp_dim", "patch_size", "image_size", "vocab_size",
                     "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        for name in ("image_pool", "text_pool"):
            if getattr(self, name) not in POOLINGS:
                raise ValueError(f"{name} must be one of {POOLINGS}, got {getattr(self, name)!r}")
        unknown = set(self.moe) - set(MOE_KEYS)
        if unknown:
            raise ValueError(f"unknown MoE options {sorted(unknown)}; known: {MOE_KEYS}")
        if not isinstance(self.moe_layers, str):
            self.moe_layers = tuple(int(i) for i in self.moe_layers)
        self.moe_layer_ids  # validates the placement rule early

    @property
    def output_dim(self) -> int:
        return self.embed_dim or self.width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Blocks whose MLP is sparse; always empty for the dense one-tower."""
        if self.kind == "dense":
            return ()
        return moe_layer_ids(self.moe_layers, self.depth)

    def moe_config(self) -> MoeConfig:
        return MoeConfig(dim=self.width, hidden_dim=self.mlp_dim, **self.moe)


def moe_layer_ids(rule: str | tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Resolve a placement rule the way V-MoE's EncoderMoe does."""
    if not isinstance(rule, str):
        ids = tuple(sorted(set(int(i) for i in rule)))
        if any(not 0 <= i < depth for i in ids):
            raise ValueError(f"MoE layer ids must be in [0, {depth}), got {rule}")
        return ids
    if rule == "none":
        return ()
    name, _, arg = rule.partition(":")
    try:
        n = int(arg)
    except ValueError:
        raise ValueError(f"moe_layers must be 'every:n', 'last:n', 'none' or a list of ids, got {rule!r}") from None
    if name == "every" and n >= 1:
        return tuple(range(n - 1, depth, n))
    if name == "last" and 0 <= n <= depth // 2:
        odd = list(range(1, depth, 2))
        return tuple(odd[len(odd) - n:]) if n else ()
    raise ValueError(f"moe_layers must be 'every:n' (n >= 1) or 'last:n' (n <= depth // 2), got {rule!r}")
