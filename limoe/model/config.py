"""ModelConfig: everything that defines a one-tower (LIMoE / dense) or two-tower contrastive model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from limoe.checks import Check, check_fields, field_checks, flag, integer, mapping, one_of, option, real
from limoe.moe.config import without_unread_options
from limoe.moe.layer import MoeConfig
from limoe.moe.routing import capacity

KINDS = ("limoe", "dense", "two_tower")
POOLINGS = ("map", "mean", "last")
# MoeConfig fields a ModelConfig may set, with their checks; dim and hidden_dim always come from width and mlp_dim.
MOE_CHECKS = field_checks(MoeConfig, exclude=("dim", "hidden_dim"))
MOE_KEYS = tuple(MOE_CHECKS)


@dataclass
class ModelConfig:
    kind: str = option("limoe", one_of(*KINDS))
    width: int = option(768, integer(ge=1))
    depth: int = option(12, integer(ge=1))
    heads: int = option(12, integer(ge=1))  # must divide width
    mlp_dim: int = option(3072, integer(ge=1))
    patch_size: int = option(16, integer(ge=1))  # must divide image_size
    image_size: int = option(224, integer(ge=1))
    in_channels: int = option(3, integer(ge=1))
    vocab_size: int = option(32_000, integer(ge=1))
    context_length: int = option(16, integer(ge=1))  # fixed text length of the authors' setups
    pad_id: int = option(0, integer(ge=0))
    embed_dim: int | None = option(None, integer(ge=1, none=True))  # shared embedding space; None: width
    image_pool: str = option("map", one_of(*POOLINGS))
    text_pool: str = option("map", one_of(*POOLINGS))
    # MoE placement: "every:n" (blocks n-1, 2n-1, ...), "last:n" (the last n odd blocks), "none", or block ids.
    moe_layers: str | tuple[int, ...] = option("every:2", Check((str, tuple), item=integer(ge=0)))
    # MoeConfig keyword arguments (num_experts, k, ...), each checked as MoeConfig declares it
    moe: dict[str, Any] = option(check=mapping(keys=MOE_CHECKS), factory=dict)
    temperature_init: float = option(math.log(10.0), real())  # learned log logit scale
    max_logit_scale: float = option(100.0, real(gt=0))  # CLIP's clamp: keeps the softmax from becoming a hard argmax
    logit_bias_init: float | None = option(None, real(none=True))  # SigLIP's learned bias (e.g. -10); None: none
    norm_eps: float = option(1e-6, real(gt=0))
    # Every weight outside the MoE layers starts as the dense model's of the same seed (experts and routers draw
    # from streams of their own): paired comparisons with dense differ by the MoE layers alone.
    paired_init: bool = option(False, flag())

    def __post_init__(self) -> None:
        check_fields(self)  # each field's declared type and range; below, the checks across fields
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
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
        moe = dict(self.moe)
        if moe.get("router") == "soft" and moe.get("slots_per_expert") is None:
            moe["slots_per_expert"] = self._soft_slots_per_expert(moe)
        return MoeConfig(dim=self.width, hidden_dim=self.mlp_dim, **moe)

    def routing_group_tokens(self, moe: MoeConfig) -> int | None:
        """Tokens of one training routing group: group_size pairs of (patches + text positions) with joint groups,
        else group_size examples of the larger modality; None without group_size (each call is one group)."""
        if moe.group_size is None:
            return None
        joint = self.kind == "limoe" and moe.routing_groups == "joint"
        per_example = self.num_patches + self.context_length if joint else max(self.num_patches, self.context_length)
        return moe.group_size * per_example

    def _soft_slots_per_expert(self, moe: dict[str, Any]) -> int | None:
        """Soft MoE's default slots per expert: the top-1 capacity of a training routing group, so that its E*p
        slots cost what top_k's k=1 buffers cost; None without group_size."""
        top_k = MoeConfig(dim=self.width, hidden_dim=self.mlp_dim,
                          **without_unread_options({**moe, "router": "top_k", "k": 1}))
        tokens = self.routing_group_tokens(top_k)
        if tokens is None:
            return None
        return capacity(tokens, top_k.num_experts, 1, top_k.capacity_factor, top_k.capacity_multiple_of,
                        top_k.capacity_rounding)

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
