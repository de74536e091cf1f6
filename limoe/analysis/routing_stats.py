"""Routing statistics of a contrastive model over a sample of image-text pairs: what the blog's pictures show.

`analyze_routing(model, tokenizer, pairs)` encodes the pairs in batches, by default exactly as training does
(`model(images, texts)`: a one-tower model with joint routing groups routes each pair's patches and text tokens
together; `pairs=False` encodes each modality in its own pass, as inference does), records every call of every
MoE layer, and keeps, per layer:

- the layer's `MoeStats` summed over every batch and call (counts, so rates weight every token equally);
- the mean of each aux loss per kind of call ("pairs", "image" or "text"; unweighted, as the layer reports them);
- per expert, how often each text token id was processed by it (-> its most typical text tokens);
- per expert, its `top_patches` highest-gate image patches, with their pixels (-> typical patches);
- for the first few images, the top-1 expert of every patch and whether it was kept (-> token-to-expert maps).

Calls are recorded by forward hooks and layers told apart by module identity, so one-tower models (one layer
sees both modalities) and two-tower models (each encoder has its own layers) are both handled; a model without
MoE layers gives an analysis with no layers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from limoe.deprecation import renamed_arguments, renamed_attribute
from limoe.model.block import IMAGE, MODALITIES, TEXT
from limoe.moe.stats import MoeStats
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the data layer's default normalisation, undone for pictures
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class AnalysisConfig:
    num_pairs: int | None = 256  # pairs to read from the iterable (None: all)
    batch_size: int = 32  # pairs per forward; the model's routing groups (moe.group_size) split each batch
    train_routing: bool = False  # route as in training (train capacity factor, router noise) instead of eval
    pairs: bool = True  # encode pairs as training does (joint groups); False: each modality alone (inference)
    top_tokens: int = 10  # most typical text tokens kept per expert
    top_patches: int = 8  # highest-gate image patches kept per expert
    num_maps: int = 16  # images whose per-patch expert maps (and pixels) are kept
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


@dataclass(eq=False)  # identity: the same layer object is shared by every pass through it
class LayerRef:
    """One MoE layer: which encoder (one-tower: 'shared'), which block, which kinds of calls routed through it."""

    name: str  # e.g. "block 1" or "image block 1"
    encoder: str
    block: int
    num_experts: int
    k: int
    passes: tuple[str, ...] = ()  # "pairs" (both modalities in joint groups), "image", "text"; in call order


@dataclass
class LayerRouting:
    ref: LayerRef
    stats: MoeStats  # summed over every batch of every pass through this layer
    aux_losses: dict[str, float]  # "<pass>/<loss name>" -> mean over batches
    token_counts_EV: torch.Tensor  # kept text assignments per expert and token id
    patch_gate_EP: torch.Tensor  # the top_patches highest gates of kept image assignments per expert (-inf: fewer)
    patch_where_EP2: torch.Tensor  # (image index, patch index) of those, -1 where empty
    patch_pixels_EP3HW: torch.Tensor  # their pixels in [0, 1]
    map_expert_IP: torch.Tensor  # top-1 expert of every patch of the first images
    map_kept_IP: torch.Tensor  # whether that top-1 assignment was kept (else the token skipped or fell back)

    patch_pixels_EP3hw = renamed_attribute("patch_pixels_EP3HW")


LayerRouting.__init__ = renamed_arguments(patch_pixels_EP3hw="patch_pixels_EP3HW")(LayerRouting.__init__)


@dataclass
class RoutingAnalysis:
    model_kind: str
    num_pairs: int
    batch_size: int
    train_routing: bool
    pairs: bool
    image_size: int
    patch_size: int
    modalities: tuple[str, ...]
    layers: list[LayerRouting]
    map_images_I3HW: torch.Tensor  # pixels in [0, 1] of the images with expert maps
    map_captions: list[str]
    vocab: dict[int, str] = field(default_factory=dict)  # decoded text of every token id that was counted
    top_tokens: int = 10

    @property
    def has_moe(self) -> bool:
        return bool(self.layers)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def top_tokens_of(self, layer: int, expert: int) -> list[tuple[str, int, float]]:
        """(token text, times this expert processed it, share of that token's kept assignments it took)."""
        counts_EV = self.layers[layer].token_counts_EV
        counts_V = counts_EV[expert]
        total_V = counts_EV.sum(0)
        n = min(self.top_tokens, int((counts_V > 0).sum()))
        # Ties broken by the token's share: a token this expert takes every time is more typical of it.
        score_V = counts_V + total_V.clamp(min=1).reciprocal() * counts_V * 1e-3
        ids = score_V.topk(n).indices.tolist() if n else []
        return [(self.vocab.get(i, f"#{i}"), int(counts_V[i]), float(counts_V[i] / total_V[i])) for i in ids]

    def top_patches_of(self, layer: int, expert: int) -> list[dict[str, Any]]:
        lr = self.layers[layer]
        out = []
        for gate, (image, patch) in zip(lr.patch_gate_EP[expert].tolist(), lr.patch_where_EP2[expert].tolist()):
            if image >= 0:
                out.append({"image": image, "patch": patch, "row": patch // self.grid, "col": patch % self.grid,
                            "gate": gate})
        return out

    def to_json(self) -> dict[str, Any]:
        """Every number of the analysis as plain JSON types (NaN, e.g. a rate over no tokens, becomes null)."""
        return _clean({
            "model_kind": self.model_kind,
            "has_moe": self.has_moe,
            "num_pairs": self.num_pairs,
            "batch_size": self.batch_size,
            "routing": "train" if self.train_routing else "eval",
            "passes": "pairs" if self.pairs else "separate",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "grid": self.grid,
            "modalities": list(self.modalities),
            "layers": [self._layer_json(i) for i in range(len(self.layers))],
            "maps": {
                "captions": self.map_captions,
                # Per layer, per image, the grid of top-1 experts (row-major) and whether each was kept.
                "expert": [lr.map_expert_IP.tolist() for lr in self.layers],
                "kept": [lr.map_kept_IP.tolist() for lr in self.layers],
            },
        })

    def _layer_json(self, i: int) -> dict[str, Any]:
        lr = self.layers[i]
        s = lr.stats
        mods = list(s.modalities)
        per_modality = {
            m: {"tokens": _count(s.tokens_M[j]), "top1_kept": _count(s.top1_kept_M[j]),
                "dropped": _count(s.dropped_M[j]), "routing_success": s.routing_success_M[j].item(),
                "dropped_fraction": s.dropped_fraction_M[j].item(), "mean_entropy": s.mean_entropy_M[j].item()}
            for j, m in enumerate(mods)
        }
        experts = []
        for e in range(lr.ref.num_experts):
            experts.append({
                "expert": e,
                "processed": {m: _count(s.processed_ME[j, e]) for j, m in enumerate(mods)},
                "routed": {m: _count(s.routed_ME[j, e]) for j, m in enumerate(mods)},
                "share": {m: s.modality_share_ME[j, e].item() for j, m in enumerate(mods)},
                "load": s.expert_load_E[e].item(),
                "top_tokens": [{"token": t, "count": c, "share": sh} for t, c, sh in self.top_tokens_of(i, e)],
                "top_patches": self.top_patches_of(i, e),
            })
        return {"name": lr.ref.name, "encoder": lr.ref.encoder, "block": lr.ref.block,
                "num_experts": lr.ref.num_experts, "k": lr.ref.k, "passes": list(lr.ref.passes),
                "modality": per_modality, "aux_losses": lr.aux_losses, "experts": experts}


def _count(t: torch.Tensor) -> int | float:
    """A count MoeStats sums in floating point, as the integer it is (9, not 9.0: the report prints it as such)."""
    value = t.item()
    return int(value) if float(value).is_integer() else value


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# -- discovering the layers -----------------------------------------------------------------------------------

def moe_layers_of(model) -> list[tuple[torch.nn.Module, LayerRef]]:
    """Every MoE layer of the model (the image encoder's, then the text encoder's unless it is the same one)."""
    image_enc, text_enc = model.encoder_for(IMAGE), model.encoder_for(TEXT)
    shared = image_enc is text_enc
    out = []
    for tower, enc in (("image", image_enc),) if shared else (("image", image_enc), ("text", text_enc)):
        for b, block in enumerate(enc.blocks):
            if block.is_moe:
                cfg = block.mlp.config
                name = f"block {b}" if shared else f"{tower} block {b}"
                out.append((block.mlp, LayerRef(name, "shared" if shared else tower, b, cfg.num_experts, cfg.k)))
    return out


@contextmanager
def recorded_moe_calls(layers: list[torch.nn.Module]):
    """Collects (layer, modality argument, MoeAux) of every call of `layers` while the context is open."""
    calls: list[tuple[torch.nn.Module, Any, Any]] = []

    def hook(module, args, kwargs, output):
        calls.append((module, kwargs.get("modality", args[1] if len(args) > 1 else None), output[1]))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# -- the pass over the data -----------------------------------------------------------------------------------

def _batches(pairs: Iterable[tuple[torch.Tensor, str]], batch_size: int,
             limit: int | None) -> Iterator[tuple[torch.Tensor, list[str]]]:
    images, captions, seen = [], [], 0
    for image, caption in pairs:
        if limit is not None and seen >= limit:
            break
        images.append(image)
        captions.append(caption)
        seen += 1
        if len(images) == batch_size:
            yield torch.stack(images), captions
            images, captions = [], []
    if images:
        yield torch.stack(images), captions


class _LayerAccumulator:
    """Running sums for one layer; the top patches are merged batch by batch so memory stays bounded."""

    def __init__(self, ref: LayerRef, vocab_size: int, cfg: AnalysisConfig, num_patches: int, patch_px: int):
        E, top = ref.num_experts, cfg.top_patches
        self.ref, self.cfg = ref, cfg
        self.stats: MoeStats | None = None
        self.loss_sum: dict[str, float] = defaultdict(float)
        self.loss_n: dict[str, int] = defaultdict(int)
        self.token_counts_EV = torch.zeros(E, vocab_size, dtype=torch.float64)
        self.patch_gate_EP = torch.full((E, top), -math.inf)
        self.patch_where_EP2 = torch.full((E, top, 2), -1, dtype=torch.long)
        self.patch_pixels_EP3HW = torch.zeros(E, top, 3, patch_px, patch_px)
        self.map_expert: list[torch.Tensor] = []
        self.map_kept: list[torch.Tensor] = []
        self.num_patches = num_patches

    def add_call(self, modality, aux, ids_BT: torch.Tensor, first_image: int, patches_BP3hw: torch.Tensor,
                 maps_left: int) -> None:
        """One MoE call over B examples of N tokens: an image or text pass (int modality) or joint pairs (a [B, N]
        modality id per token, the same for every example). Its image and text columns are counted apart."""
        r = aux.routing
        B = ids_BT.shape[0]
        expert_BNK, kept_BNK, gate_BNK = (t.cpu().view(B, -1, r.k)
                                          for t in (r.expert_SK, r.kept_SK, r.gate_SK.float()))
        # The layer's modality ids index its own config.modalities, not the model's IMAGE / TEXT.
        image_id, text_id = (aux.stats.modalities.index(name) for name in MODALITIES)
        if isinstance(modality, torch.Tensor):
            modality_N, kind = modality[0].cpu(), "pairs"
        else:
            modality = 0 if modality is None else modality  # MoeMlp's default: its first modality
            modality_N, kind = torch.full((expert_BNK.shape[1],), modality), aux.stats.modalities[modality]
        if kind not in self.ref.passes:
            self.ref.passes += (kind,)
        self.add_common(kind, aux)
        image_N, text_N = modality_N == image_id, modality_N == text_id
        if image_N.any():
            self.add_image(expert_BNK[:, image_N], kept_BNK[:, image_N], gate_BNK[:, image_N], first_image,
                           patches_BP3hw, maps_left, r.ranked)
        if text_N.any():
            self.add_text(expert_BNK[:, text_N], kept_BNK[:, text_N], ids_BT[:, :int(text_N.sum())])

    def add_common(self, pass_name: str, aux) -> None:
        self.stats = aux.stats if self.stats is None else self.stats + aux.stats
        for name, value in aux.losses.items():
            self.loss_sum[f"{pass_name}/{name}"] += float(value)
            self.loss_n[f"{pass_name}/{name}"] += 1

    def add_text(self, expert_BTK: torch.Tensor, kept_BTK: torch.Tensor, ids_BT: torch.Tensor) -> None:
        expert_A = expert_BTK[kept_BTK]
        token_A = ids_BT[..., None].expand_as(kept_BTK)[kept_BTK]
        vocab_size = self.token_counts_EV.shape[1]
        ones_A = torch.ones(len(expert_A), dtype=torch.float64)
        self.token_counts_EV.view(-1).index_add_(0, expert_A * vocab_size + token_A, ones_A)

    def add_image(self, expert_BPK: torch.Tensor, kept_BPK: torch.Tensor, gate_BPK: torch.Tensor, first_image: int,
                  patches_BP3hw: torch.Tensor, maps_left: int, ranked: bool = True) -> None:
        B, P = patches_BP3hw.shape[:2]
        expert_SK, kept_SK, gate_SK = (t.reshape(B * P, -1) for t in (expert_BPK, kept_BPK, gate_BPK))
        if maps_left > 0:
            n = min(maps_left, B)
            expert_S, kept_S = map_choice(expert_SK, kept_SK, gate_SK, ranked)
            self.map_expert.append(expert_S.view(B, P)[:n])
            self.map_kept.append(kept_S.view(B, P)[:n])
        # Candidates: every kept assignment, scored by its gate; merged with the running top patches of each expert.
        token_A = torch.arange(B * P)[:, None].expand_as(kept_SK)[kept_SK]
        expert_A, gate_A = expert_SK[kept_SK], gate_SK[kept_SK]
        top = self.cfg.top_patches
        for e in range(self.ref.num_experts):
            sel = expert_A == e
            if not bool(sel.any()) or top == 0:
                continue
            gates = gate_A[sel]
            best_of_call = gates.topk(min(top, len(gates)))
            tokens = token_A[sel][best_of_call.indices]
            where = torch.stack([first_image + tokens // P, tokens % P], 1)
            pixels = patches_BP3hw.reshape(B * P, *patches_BP3hw.shape[2:])[tokens]
            all_gate = torch.cat([self.patch_gate_EP[e], best_of_call.values])
            best = all_gate.topk(top).indices
            self.patch_gate_EP[e] = all_gate[best]
            self.patch_where_EP2[e] = torch.cat([self.patch_where_EP2[e], where])[best]
            self.patch_pixels_EP3HW[e] = torch.cat([self.patch_pixels_EP3HW[e], pixels])[best]

    def result(self) -> LayerRouting:
        P = self.num_patches
        cat = (lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, P, dtype=dtype))
        return LayerRouting(
            ref=self.ref, stats=self.stats,
            aux_losses={k: self.loss_sum[k] / self.loss_n[k] for k in sorted(self.loss_sum)},
            token_counts_EV=self.token_counts_EV, patch_gate_EP=self.patch_gate_EP,
            patch_where_EP2=self.patch_where_EP2, patch_pixels_EP3HW=self.patch_pixels_EP3HW,
            map_expert_IP=cat(self.map_expert, torch.long), map_kept_IP=cat(self.map_kept, torch.bool))


def _token_text(tokenizer, token_id: int) -> str:
    """Readable text of one token; special tokens (EOS) decode to "", so fall back to their vocabulary name."""
    text = tokenizer.decode([token_id])
    if text:
        return text
    hf = getattr(tokenizer, "hf", None)
    name = hf.id_to_token(token_id) if hf is not None else None
    return name or f"#{token_id}"


def _to_patches(images_B3HW: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, P, 3, patch, patch] in raster order, the order PatchEmbed flattens its grid in."""
    B, channels, H, W = images_B3HW.shape
    x = images_B3HW.reshape(B, channels, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), channels, patch, patch)


@torch.no_grad()
def map_choice(expert_SK: torch.Tensor, kept_SK: torch.Tensor, gate_SK: torch.Tensor, ranked: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, kept) of each token on a token map: its top choice when tokens choose (`Routing.ranked`); when
    experts choose tokens, the expert with the largest gate among those that picked it (kept: picked by any)."""
    if ranked:
        return expert_SK[:, 0], kept_SK[:, 0]
    best_S = torch.where(kept_SK, gate_SK, -1.0).argmax(1, keepdim=True)
    return expert_SK.gather(1, best_S)[:, 0], kept_SK.any(1)


def analyze_routing(model, tokenizer, pairs: Iterable[tuple[torch.Tensor, str]],
                    cfg: AnalysisConfig | None = None) -> RoutingAnalysis:
    """Run `model` over (image [3,H,W] normalised, caption) pairs and collect the routing analysis.

    `tokenizer(texts)` must return a TokenBatch (ids_BT, padding_mask_BT) and `tokenizer.decode(ids)` text.
    The model's train/eval mode is restored afterwards.
    """
    cfg = cfg or AnalysisConfig()
    mc = model.config
    device = next(model.parameters()).device
    was_training = model.training
    model.train(cfg.train_routing)
    layers = moe_layers_of(model)
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    acc = {id(layer): _LayerAccumulator(ref, mc.vocab_size, cfg, mc.num_patches, mc.patch_size)
           for layer, ref in layers}
    map_images, map_captions = [], []
    seen = 0
    try:
        # No graph: analysis only reads routing (and grad-tracking losses would warn at every float()).
        with torch.no_grad(), recorded_moe_calls([layer for layer, _ in layers]) as calls:
            for images_B3HW, captions in _batches(pairs, cfg.batch_size, cfg.num_pairs):
                tokens = tokenizer(captions)
                ids_BT, valid_BT = tokens.ids_BT, ~tokens.padding_mask_BT
                calls.clear()
                if cfg.pairs:
                    model(images_B3HW.to(device), ids_BT.to(device), valid_BT.to(device))
                else:
                    model.encode_image(images_B3HW.to(device))
                    model.encode_text(ids_BT.to(device), valid_BT.to(device))
                pixels_B3HW = (images_B3HW.float().cpu() * std + mean).clamp(0, 1)
                patches = _to_patches(pixels_B3HW, mc.patch_size)
                maps_left = cfg.num_maps - len(map_captions)
                for layer, modality, aux in calls:
                    acc[id(layer)].add_call(modality, aux, ids_BT, seen, patches, maps_left)
                if maps_left > 0:
                    map_images.append(pixels_B3HW[:maps_left])
                    map_captions += captions[:maps_left]
                seen += len(captions)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no pairs to analyse: the data gave nothing")
    layers = [acc[id(layer)].result() for layer, _ in layers]
    counted = set()
    for lr in layers:
        counted.update(lr.token_counts_EV.sum(0).nonzero().flatten().tolist())
    vocab = {i: _token_text(tokenizer, i) for i in sorted(counted)}
    modalities = tuple(layers[0].stats.modalities) if layers else ("image", "text")
    return RoutingAnalysis(
        model_kind=mc.kind, num_pairs=seen, batch_size=cfg.batch_size, train_routing=cfg.train_routing,
        pairs=cfg.pairs,
        image_size=mc.image_size, patch_size=mc.patch_size, modalities=modalities, layers=layers,
        map_images_I3HW=torch.cat(map_images) if map_images else torch.zeros(0, 3, mc.image_size, mc.image_size),
        map_captions=map_captions, vocab=vocab, top_tokens=cfg.top_tokens)
