"""What every contrastive model shares: modality embeddings, pooling, projections, temperature, the interface.

Subclasses only say which encoder processes which modality (`encoder_for`); one-tower models return the same
encoder for both, two-tower models a separate one each. A model whose encoders are one (one tower) encodes a
batch of pairs in lockstep in `forward`, so its MoE layers can route a pair's image and text tokens together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from limoe.deprecation import renamed_arguments
from limoe.model.block import IMAGE, TEXT, Encoder
from limoe.model.config import ModelConfig
from limoe.model.embed import PatchEmbed, TokenEmbed
from limoe.model.pool import make_pool
from limoe.moe.layer import MoeAux

__all__ = ["IMAGE", "TEXT", "ContrastiveModel", "ModelOutput"]


@dataclass
class ModelOutput:
    image_embeds: torch.Tensor  # [B, D], L2-normalised
    text_embeds: torch.Tensor  # [B', D], L2-normalised
    logit_scale: torch.Tensor  # scalar multiplier of the logits: exp of the model's logit_scale parameter
    logit_bias: torch.Tensor | None = None  # scalar, only for models built with logit_bias_init
    # Every MoE call: one tower, in block order (one call per block with joint routing groups, else image then
    # text); two towers, the image tower's layers, then the text tower's.
    aux: list[MoeAux] = field(default_factory=list)


class ContrastiveModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.image_embed = PatchEmbed(c.image_size, c.patch_size, c.in_channels, c.width)
        self.text_embed = TokenEmbed(c.vocab_size, c.context_length, c.width)
        self.image_pool = make_pool(c.image_pool, c.width, c.heads, c.mlp_dim, c.norm_eps)
        self.text_pool = make_pool(c.text_pool, c.width, c.heads, c.mlp_dim, c.norm_eps)
        # Linear maps W_m into the shared space; no bias since the output is normalised anyway.
        self.image_proj = nn.Linear(c.width, c.output_dim, bias=False)
        self.text_proj = nn.Linear(c.width, c.output_dim, bias=False)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=c.width ** -0.5)
        # As in open_clip: the parameter is the log of the multiplier (logits = logit_scale.exp() * cos), and
        # training clamps it after each step (clamp_logit_scale), so the gradient never vanishes at the cap.
        self.logit_scale = nn.Parameter(torch.tensor(float(c.temperature_init)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(c.logit_bias_init)))
                           if c.logit_bias_init is not None else None)

    def _make_encoder(self) -> Encoder:
        c = self.config
        layers = c.moe_layer_ids
        return Encoder(c.width, c.depth, c.heads, c.mlp_dim, layers, c.moe_config() if layers else None, c.norm_eps,
                       c.paired_init)

    def encoder_for(self, modality: int) -> Encoder:
        raise NotImplementedError

    # -- interface ----------------------------------------------------------------------------------------------
    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every block's activations in the backward (less memory); no effect without gradients."""
        for module in self.modules():
            if isinstance(module, Encoder):
                module.activation_checkpointing = enabled

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the multiplier at most max_logit_scale (CLIP's 100): call after each optimizer step."""
        self.logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def text_valid_mask(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return tokens_BT != self.config.pad_id

    @renamed_arguments(images_BCHW="images_B3HW")
    def encode_image(self, images_B3HW: torch.Tensor, normalize: bool = False, return_aux: bool = False):
        """Images [B, 3, H, W] (3: `in_channels`) -> embeddings [B, D], L2-normalised if `normalize` (open_clip's
        default: not); with `return_aux`, also the MoE records.

        Alone, images route in image-only groups (inference, zero-shot); training encodes pairs (`forward`).
        """
        x_BNd, aux = self.encoder_for(IMAGE)(self.image_embed(images_B3HW), IMAGE)
        z_BD = self._image_head(x_BNd, normalize)
        return (z_BD, aux) if return_aux else z_BD

    def encode_text(self, tokens_BT, valid_BT: torch.Tensor | None = None, normalize: bool = False,
                    return_aux: bool = False):
        """Token ids [B, T] (or a tokenizer's TokenBatch) -> embeddings [B, D], L2-normalised if `normalize`.

        Padding is `valid_BT` False, by default tokens == pad_id (a TokenBatch brings its own mask); it is masked
        out of attention keys, MoE routing and pooling, so its content never matters.
        """
        if hasattr(tokens_BT, "ids_BT"):  # a TokenBatch from limoe's Tokenizer
            tokens_BT, valid_BT = tokens_BT.ids_BT, ~tokens_BT.padding_mask_BT
        valid_BT = self._text_valid(tokens_BT, valid_BT)
        x_BTd, aux = self.encoder_for(TEXT)(self.text_embed(tokens_BT), TEXT, valid_BT)
        z_BD = self._text_head(x_BTd, valid_BT, normalize)
        return (z_BD, aux) if return_aux else z_BD

    @renamed_arguments(images_BCHW="images_B3HW")
    def forward(self, images_B3HW: torch.Tensor, tokens_BT: torch.Tensor,
                valid_BT: torch.Tensor | None = None) -> ModelOutput:
        """Training's view: a batch of image-text pairs. One tower encodes both in lockstep, block by block,
        so that (with `routing_groups="joint"`) its MoE layers route each pair's patches and text tokens in
        shared groups; two towers encode each modality in its own pass."""
        encoder = self.encoder_for(IMAGE)
        if encoder is not self.encoder_for(TEXT):
            image_BD, image_aux = self.encode_image(images_B3HW, normalize=True, return_aux=True)
            text_BD, text_aux = self.encode_text(tokens_BT, valid_BT, normalize=True, return_aux=True)
            return ModelOutput(image_BD, text_BD, self.logit_scale.exp(), self.logit_bias, image_aux + text_aux)
        valid_BT = self._text_valid(tokens_BT, valid_BT)
        image_BPd, text_BTd, aux = encoder.forward_pair(self.image_embed(images_B3HW), self.text_embed(tokens_BT),
                                                        valid_BT)
        return ModelOutput(self._image_head(image_BPd), self._text_head(text_BTd, valid_BT), self.logit_scale.exp(),
                           self.logit_bias, aux)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _text_valid(self, tokens_BT: torch.Tensor, valid_BT: torch.Tensor | None) -> torch.Tensor:
        if valid_BT is None:
            valid_BT = self.text_valid_mask(tokens_BT)
        elif valid_BT.shape != tokens_BT.shape or valid_BT.dtype != torch.bool:
            raise ValueError(f"valid_BT must be a bool tensor of shape {tuple(tokens_BT.shape)}, got "
                             f"{valid_BT.dtype} {tuple(valid_BT.shape)}")
        # An all-padding text (an empty caption) would leave attention rows with no key (NaN); let it see its
        # first position instead.
        valid_BT = valid_BT.clone()
        valid_BT[:, 0] |= ~valid_BT.any(1)
        return valid_BT

    def _image_head(self, x_BNd: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z_BD = self.image_proj(self.image_pool(x_BNd))
        return F.normalize(z_BD, dim=-1) if normalize else z_BD

    def _text_head(self, x_BTd: torch.Tensor, valid_BT: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z_BD = self.text_proj(self.text_pool(x_BTd, valid_BT))
        return F.normalize(z_BD, dim=-1) if normalize else z_BD

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
