"""Analytic parameter and FLOP counts of a ModelConfig, so presets compare without building them.

Conventions: FLOPs are forward matmul/conv FLOPs (2 per multiply-add), including attention scores; norms,
softmax, GELU and routing bookkeeping are left out. "Active parameters per token" follows the paper's
"parameters per token": the whole model except the E - K experts a token does not visit in each MoE layer (and,
in a two-tower model, except the other modality's tower).
Sparse layers are counted at K experts per token, i.e. ignoring empty capacity slots. Soft MoE (every token
mixed into every slot) is counted at its slots: E*p slot rows per routing group of S tokens cost E*p/S expert
MLPs per token, plus its router, dispatch and combine matmuls (2 d E*p FLOPs per token each); its active
parameters are counted as K = 1 expert's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from limoe.model.config import ModelConfig


@dataclass(frozen=True)
class ModelInfo:
    total_params: int
    active_params: int  # per token
    image_flops: int  # forward, one image
    text_flops: int  # forward, one text of context_length tokens
    num_moe_layers: int

    @property
    def flops_per_pair(self) -> int:
        return self.image_flops + self.text_flops


def mlp_params(d: int, h: int) -> int:
    return 2 * d * h + h + d


def _map_head(d: int, h: int) -> int:
    return d + 4 * d * d + 4 * d + 2 * d + mlp_params(d, h)  # probe, q/kv/out, norm, MLP


def _encoder_flops(c: ModelConfig, tokens: int, mlps: float, router_flops: int, num_moe: int) -> int:
    """`mlps`: expert MLPs per token (K; Soft MoE: a fraction); `router_flops`: the router's FLOPs per token."""
    d, n = c.width, tokens
    attn = 2 * (4 * n * d * d + 2 * n * n * d)  # q, k, v, out projections; scores and weighted values
    dense_mlp = 2 * 2 * n * d * c.mlp_dim
    moe_mlp = round(mlps * dense_mlp) + n * router_flops
    return c.depth * attn + (c.depth - num_moe) * dense_mlp + num_moe * moe_mlp


def _router(c: ModelConfig, moe) -> tuple[float, int, int]:
    """(expert MLPs per token, router FLOPs per token, router parameters) of a MoE layer."""
    d = c.width
    if moe.router != "soft":
        return moe.k, 2 * d * moe.num_experts, d * moe.num_experts
    slots = moe.num_experts * moe.slots_per_expert
    # Without group_size each call is one group of unknown size: counted as one example's tokens.
    group_tokens = c.routing_group_tokens(moe) or c.routing_group_tokens(replace(moe, group_size=1))
    return slots / group_tokens, 3 * 2 * d * slots, d * slots + 1  # logits, dispatch, combine; phi and scale

def _pool_flops(kind: str, c: ModelConfig, tokens: int) -> int:
    if kind != "map":
        return 0
    d = c.width
    return 2 * (d * d + 2 * tokens * d * d + 2 * tokens * d + d * d + 2 * d * c.mlp_dim)


def model_info(c: ModelConfig) -> ModelInfo:
    d, h = c.width, c.mlp_dim
    num_moe = len(c.moe_layer_ids)
    moe = c.moe_config() if num_moe else None
    num_experts, k = (moe.num_experts, moe.k) if moe else (1, 1)
    mlps, router_flops, router_params = _router(c, moe) if moe else (1, 0, 0)

    block = 2 * 2 * d + 4 * d * d + 4 * d  # two norms, attention
    encoder = (c.depth * block + (c.depth - num_moe) * mlp_params(d, h)
               + num_moe * (router_params + num_experts * mlp_params(d, h)))
    encoder += 2 * d  # final norm
    towers = 2 if c.kind == "two_tower" else 1
    patch = c.in_channels * c.patch_size ** 2 * d + d + c.num_patches * d
    text = c.vocab_size * d + c.context_length * d
    pools = sum(_map_head(d, h) for kind in (c.image_pool, c.text_pool) if kind == "map")
    total = towers * encoder + patch + text + pools + 2 * d * c.output_dim + 1 + (c.logit_bias_init is not None)
    # A token visits one tower, and K of the E experts of each of its tower's MoE layers.
    active = total - (towers - 1) * encoder - num_moe * (num_experts - k) * mlp_params(d, h)

    n, t = c.num_patches, c.context_length
    image_flops = (2 * n * c.in_channels * c.patch_size ** 2 * d + _encoder_flops(c, n, mlps, router_flops, num_moe)
                   + _pool_flops(c.image_pool, c, n) + 2 * d * c.output_dim)
    text_flops = (_encoder_flops(c, t, mlps, router_flops, num_moe) + _pool_flops(c.text_pool, c, t)
                  + 2 * d * c.output_dim)
    return ModelInfo(total, active, image_flops, text_flops, num_moe)
