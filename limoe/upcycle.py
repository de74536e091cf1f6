"""Sparse upcycling (Komatsuzaki et al., 2022): a sparse model started from a trained dense one-tower checkpoint.

Every weight the two models share is copied; each MoE layer's experts start as copies of that block's dense MLP;
the routers keep their fresh init (with the router noise, they alone tell the copies apart at first). The MoE
model must have the dense model's shape (width, depth, heads, MLP size, patches, vocabulary, pooling): only its
MLPs may differ. Training then uses the dense run's tokenizer, which the token embeddings belong to.

    limoe train --init-from runs/dense-run          # a run folder (its latest checkpoint) or a checkpoint
"""

from __future__ import annotations

import torch

from limoe.errors import UserError
from limoe.model.config import ModelConfig

# An expert tensor of the MoE layer -> (the dense MLP's tensor, whether the dense layout is transposed)
_EXPERT_SOURCES = {"w_in_Edh": ("fc_in.weight", True), "b_in_Eh": ("fc_in.bias", False),
                   "w_out_Ehd": ("fc_out.weight", True), "b_out_Ed": ("fc_out.bias", False)}


# What the two models must share: everything but the MLPs
SHAPE_KEYS = ("width", "depth", "heads", "mlp_dim", "patch_size", "image_size", "in_channels", "vocab_size",
              "context_length", "embed_dim", "image_pool", "text_pool")


class UpcycleError(UserError, ValueError):
    """The dense checkpoint cannot start this model."""


def upcycle(checkpoint, name: str = "limoe-tiny", **overrides):
    """The model preset `name` at the dense checkpoint's shape (`overrides` on top, e.g. num_experts=16), started
    from its weights; in train mode, as any new model. The checkpoint's tokenizer goes with it
    (`limoe.get_tokenizer(checkpoint)`)."""
    from limoe import checkpoint as ckpt
    from limoe.model.registry import build_model, get_config

    path = ckpt.resolve(checkpoint)
    dense = ckpt.read_model_config(path)
    config = get_config(name, **{**{k: getattr(dense, k) for k in SHAPE_KEYS}, **overrides})
    check_upcyclable(dense, config, str(path))
    model = build_model(config)
    model.load_state_dict(upcycled_weights(ckpt.read_weights(path), config), strict=False)  # routers: fresh
    return model


def check_upcyclable(dense: ModelConfig, sparse: ModelConfig, source: str) -> None:
    """Refuse, in one line, a source that is not a dense one-tower model or a target of another shape."""
    if dense.kind != "dense":
        raise UpcycleError(f"{source} holds a {dense.kind} model; --init-from takes a dense one-tower checkpoint")
    if sparse.kind == "two_tower" or not sparse.moe_layer_ids:
        raise UpcycleError(f"--init-from starts a sparse one-tower model from {source}, not a {sparse.kind} model "
                           f"without MoE layers")
    different = [f"{k}: {getattr(dense, k)} there, {getattr(sparse, k)} here" for k in SHAPE_KEYS
                 if getattr(dense, k) != getattr(sparse, k)]
    if different:
        raise UpcycleError(f"{source} is a model of another shape ({'; '.join(different[:3])}); upcycling copies "
                           f"its weights, so set the same model.* values")


def upcycled_weights(dense: dict[str, torch.Tensor], sparse: ModelConfig) -> dict[str, torch.Tensor]:
    """The sparse model's weights from the dense model's `dense` state dict: shared keys copied, experts copied
    from their block's MLP; the routers' keys are left out (they keep their init). Checked both ways: a weight of
    either model that has no counterpart is an UpcycleError."""
    from limoe.model.registry import build_model

    with torch.device("meta"):
        target = build_model(sparse).state_dict()
    num_experts = sparse.moe_config().num_experts
    out, used = {}, set()
    for key, meta in target.items():
        prefix, _, leaf = key.rpartition("experts.")
        if prefix and leaf in _EXPERT_SOURCES:
            name, transposed = _EXPERT_SOURCES[leaf]
            source = _take(dense, prefix + name, used)
            one = source.t() if transposed else source
            out[key] = one.unsqueeze(0).expand(num_experts, *one.shape).clone()
        elif ".mlp." in key and key.rsplit(".", 1)[-1].startswith("router"):
            continue  # fresh
        else:
            out[key] = _take(dense, key, used)
        if out[key].shape != meta.shape:
            raise UpcycleError(f"{key}: the dense weights give shape {tuple(out[key].shape)}, the model needs "
                               f"{tuple(meta.shape)}")
    unused = sorted(set(dense) - used)
    if unused:
        raise UpcycleError(f"the dense checkpoint has weights this model has no place for: {', '.join(unused[:3])}")
    return out


def _take(dense: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in dense:
        raise UpcycleError(f"the dense checkpoint has no {key}")
    used.add(key)
    return dense[key]
