"""Contrastive losses (softmax CLIP, sigmoid SigLIP) over the global batch, and the weighted total with MoE aux.

Distributed: when torch.distributed is initialised, embeddings are all-gathered with autograd, so gradients of
the other ranks' loss terms flow back to the local shard (the gather's backward sums them over ranks). With
`local_loss=True` each rank scores only its own rows against the global batch: the mean of the ranks' losses
equals the single-process loss on the concatenated batch, and DDP's gradient averaging then gives exactly that
loss's gradient. With `local_loss=False` every rank computes the full global loss (same value everywhere).
Every rank must contribute the same batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from limoe.checks import ConfigError, check_fields, flag, mapping, one_of, option, real
from limoe.model.base import ModelOutput
from limoe.moe.layer import MoeAux


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [world * B, D], rank-major; differentiable w.r.t. the local shard."""
    _, world = _world()
    if world == 1:
        return x_BD
    from limoe.parallel.collectives import all_gather

    return all_gather(x_BD)


def _pair_logits(image_BD, text_BD, logit_scale, local_loss):
    """Image-major logits: rows are (local or all) images, columns all texts; plus the row offset."""
    rank, world = _world()
    # Float32 even under autocast: with a logit scale near 100, bf16 similarities would round away the
    # differences the loss is about.
    with torch.autocast(device_type=image_BD.device.type, enabled=False):
        image_BD, text_BD = image_BD.float(), text_BD.float()
        logit_scale = torch.as_tensor(logit_scale, device=image_BD.device).float()
        image_all, text_all = gather_with_grad(image_BD), gather_with_grad(text_BD)
        if world > 1 and local_loss:
            return logit_scale * image_BD @ text_all.T, logit_scale * text_BD @ image_all.T, rank * image_BD.shape[0]
        logits_ij = logit_scale * image_all @ text_all.T
        return logits_ij, logits_ij.T, 0


def clip_loss(image_BD: torch.Tensor, text_BD: torch.Tensor, logit_scale: torch.Tensor,
              local_loss: bool = True) -> torch.Tensor:
    """Softmax contrastive loss: (CE over image rows + CE over text rows) / 2, positives on the diagonal."""
    if image_BD.shape != text_BD.shape:
        raise ValueError(f"image and text embeddings must pair up, got {tuple(image_BD.shape)} and "
                         f"{tuple(text_BD.shape)}")
    logits_img, logits_txt, offset = _pair_logits(image_BD, text_BD, logit_scale, local_loss)
    labels = offset + torch.arange(logits_img.shape[0], device=image_BD.device)
    return (F.cross_entropy(logits_img.float(), labels) + F.cross_entropy(logits_txt.float(), labels)) / 2


def siglip_loss(image_BD: torch.Tensor, text_BD: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | float | None = None, local_loss: bool = True) -> torch.Tensor:
    """Sigmoid loss: -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z = +1 for pairs, -1 otherwise."""
    if image_BD.shape != text_BD.shape:
        raise ValueError(f"image and text embeddings must pair up, got {tuple(image_BD.shape)} and "
                         f"{tuple(text_BD.shape)}")
    logits_img, _, offset = _pair_logits(image_BD, text_BD, logit_scale, local_loss)
    logits_img = logits_img.float() + (0.0 if logit_bias is None else logit_bias)
    rows, cols = logits_img.shape
    positive = (offset + torch.arange(rows, device=image_BD.device))[:, None] == torch.arange(cols,
                                                                                             device=image_BD.device)
    sign = positive.float() * 2 - 1
    return -F.logsigmoid(sign * logits_img).sum() / rows


CONTRASTIVE = ("softmax", "sigmoid")  # CLIP, SigLIP
# LossConfig's fields that weigh the aux losses routers report, one weight each or one per modality.
AUX_WEIGHTS = ("importance", "load", "z")
AUX_MODALITY_WEIGHTS = ("local_entropy", "global_entropy")


# LIMoE's entropy-loss weights per modality with the top_k router: a starting point, not values from the paper,
# which does not state them. Expert Choice and Soft MoE train without aux losses in V-MoE, so by default here too.
DEFAULT_ENTROPY_WEIGHTS = {"top_k": {"image": 0.01, "text": 0.01}}


def entropy_weights(weights: dict[str, float], router: str) -> dict[str, float]:
    """The weight of each modality: `weights` over the router's defaults (a modality neither names weighs 0)."""
    return {**DEFAULT_ENTROPY_WEIGHTS.get(router, {}), **weights}


@dataclass
class LossConfig:
    """Which contrastive loss and how much each MoE aux loss weighs (aux losses are summed over MoE layers).
    Entropy weights are per modality, each over the router's default (DEFAULT_ENTROPY_WEIGHTS: 0.01 per modality
    for top_k, none for the other routers)."""

    contrastive: str = option("softmax", one_of(*CONTRASTIVE))  # sigmoid: training adds SigLIP's bias (-10)
    local_loss: bool = option(True, flag())
    importance: float = option(0.005, real(ge=0))  # V-MoE
    load: float = option(0.005, real(ge=0))  # V-MoE
    z: float = option(0.0, real(ge=0))
    local_entropy: dict[str, float] = option(check=mapping(real(ge=0)), factory=dict)
    global_entropy: dict[str, float] = option(check=mapping(real(ge=0)), factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)  # when built, too: a loss misnamed in a saved config must not train another loss

    def resolved(self, router: str = "top_k") -> "LossConfig":
        """This config with `router`'s default entropy weights written out."""
        return dataclasses.replace(self, **{kind: entropy_weights(getattr(self, kind), router)
                                            for kind in AUX_MODALITY_WEIGHTS})

    def weight(self, aux_name: str, router: str = "top_k") -> float:
        """Weight of an aux loss by the name `router` reports it under: "importance" is the field `importance`,
        "local_entropy/text" the entry "text" of the field `local_entropy` (over the router's default). Any
        other name is an error, so that a router's new loss cannot train silently unweighted."""
        kind, slash, modality = aux_name.partition("/")
        if kind in (AUX_MODALITY_WEIGHTS if slash else AUX_WEIGHTS):
            if not slash:
                return float(getattr(self, kind))
            return float(entropy_weights(getattr(self, kind), router).get(modality, 0.0))
        known = AUX_WEIGHTS + tuple(f"{kind}/<modality>" for kind in AUX_MODALITY_WEIGHTS)
        raise ConfigError(f"no weight for the MoE aux loss {aux_name!r}; the loss config weighs {', '.join(known)}")


def sum_aux_losses(aux: list[MoeAux]) -> dict[str, torch.Tensor]:
    """Unweighted aux losses summed over every MoE record (layers, and passes where modalities route apart), by
    name.

    A per-modality loss such as "global_entropy/text" is exactly 0 (with a zero gradient) in a call without
    that modality, so summing over all calls gives each modality's terms from the calls that route it.
    """
    totals: dict[str, torch.Tensor] = {}
    for record in aux:
        for name, value in record.losses.items():
            totals[name] = totals[name] + value if name in totals else value
    return totals


DEFAULT_LOSSES = LossConfig()


def compute_losses(output: ModelOutput, config: LossConfig | None = None) -> dict[str, torch.Tensor]:
    """Named loss terms for logging: weighted `*_loss` entries, `total_loss` = their sum, and the unweighted
    aux sums as `aux/<name>` (not part of the total)."""
    config = config or DEFAULT_LOSSES  # built once, outside any compiled region (its checks run when built)
    if config.contrastive == "softmax":
        contrastive = clip_loss(output.image_embeds, output.text_embeds, output.logit_scale, config.local_loss)
    else:
        contrastive = siglip_loss(output.image_embeds, output.text_embeds, output.logit_scale, output.logit_bias,
                                  config.local_loss)
    terms = {"contrastive_loss": contrastive}
    raw = sum_aux_losses(output.aux)
    router = output.aux[0].router if output.aux else "top_k"  # every MoE layer of a model has the same router
    for name, value in raw.items():
        weight = config.weight(name, router)
        if weight:
            terms[f"{name.replace('/', '_')}_loss"] = weight * value
    terms["total_loss"] = sum(terms.values())
    terms.update({f"aux/{name}": value.detach() for name, value in raw.items()})
    return terms
