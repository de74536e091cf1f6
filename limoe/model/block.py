"""Pre-LN transformer blocks whose MLP is dense or a sparse MoE, and the encoder that stacks them."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from limoe.model.mlp import Mlp
from limoe.moe.layer import MoeAux, MoeConfig, MoeMlp

# The model's modalities and their ids (which embedding, which tower). A MoE layer numbers modalities by its own
# `MoeConfig.modalities`; blocks translate with `moe_modality_ids`.
MODALITIES = ("image", "text")
IMAGE, TEXT = 0, 1

# timm's `mlp_layer`: builds a block's MLP from (dim, hidden_dim); `Mlp` (dense) or `moe_mlp(config)`.
MlpLayer = Callable[[int, int], nn.Module]


def moe_mlp(config: MoeConfig) -> MlpLayer:
    """An `mlp_layer` building `MoeMlp(config)`; its dim and hidden_dim must be the block's."""
    def build(dim: int, hidden_dim: int) -> MoeMlp:
        if (dim, hidden_dim) != (config.dim, config.hidden_dim):
            raise ValueError(f"MoeConfig has dim={config.dim}, hidden_dim={config.hidden_dim}; the block needs "
                             f"{dim}, {hidden_dim}")
        return MoeMlp(config)
    return build


def paired_moe_mlp(config: MoeConfig) -> MlpLayer:
    """`moe_mlp(config)` that leaves the global RNG exactly as a dense block's `Mlp` would: it draws that Mlp (and
    drops it), then builds the MoE layer from a stream of its own, seeded by the global RNG's state (so each MoE
    layer differs, and each seed). Every other weight is then the dense model's of the same seed, and paired
    comparisons of the two differ by the MoE layers alone (`ModelConfig.paired_init`)."""
    plain = moe_mlp(config)

    def build(dim: int, hidden_dim: int) -> MoeMlp:
        state = torch.random.get_rng_state()
        Mlp(dim, hidden_dim)
        digest = hashlib.sha256(state.numpy().tobytes()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
            return plain(dim, hidden_dim)
    return build


def moe_modality_ids(config: MoeConfig) -> tuple[int, ...]:
    """The MoE ids of the model's modalities (IMAGE, TEXT): their places in `config.modalities`."""
    if not set(MODALITIES) <= set(config.modalities):
        raise ValueError(f"moe.modalities must name the model's modalities {MODALITIES}, got {config.modalities}")
    return tuple(config.modalities.index(name) for name in MODALITIES)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention; `valid_BN` False marks keys (padding) nobody may attend to."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        for layer in (self.qkv, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_BNd: torch.Tensor, valid_BN: torch.Tensor | None = None) -> torch.Tensor:
        B, N, d = x_BNd.shape
        q_BaNc, k_BaNc, v_BaNc = self.qkv(x_BNd).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if valid_BN is None else valid_BN[:, None, None, :]  # [B, 1, 1, N]: True = may attend
        o_BaNc = F.scaled_dot_product_attention(q_BaNc, k_BaNc, v_BaNc, attn_mask=mask)
        return self.out(o_BaNc.transpose(1, 2).reshape(B, N, d))


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)) where MLP is `mlp_layer(dim, mlp_dim)`: `Mlp` or a `MoeMlp`."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, mlp_layer: MlpLayer = Mlp, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp_layer(dim, mlp_dim)
        self.moe_modality = moe_modality_ids(self.mlp.config) if self.is_moe else None  # model id -> MoE id

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoeMlp)

    @property
    def routes_jointly(self) -> bool:
        """Whether a pair's image and text tokens share this block's routing groups."""
        return self.is_moe and self.mlp.config.routing_groups == "joint"

    def forward(self, x_BNd: torch.Tensor, modality: int, valid_BN: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoeAux | None]:
        """One modality: a batch of images or of texts."""
        x_BNd = x_BNd + self.attn(self.norm1(x_BNd), valid_BN)
        y_BNd, aux = self._mlp(self.norm2(x_BNd), modality, valid_BN)
        return x_BNd + y_BNd, aux

    def forward_pair(self, image_BPd: torch.Tensor, text_BTd: torch.Tensor, text_valid_BT: torch.Tensor,
                     modality_BN: torch.Tensor, valid_BN: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, list[MoeAux]]:
        """Both modalities of a batch of pairs in lockstep: attention within each image and each text (no
        cross-attention), then the MLP. A joint MoE sees every pair's P patches and T text positions as one
        example of N = P + T tokens (`modality_BN`, `valid_BN` describe them), so pairs share routing groups."""
        image_BPd = image_BPd + self.attn(self.norm1(image_BPd))
        text_BTd = text_BTd + self.attn(self.norm1(text_BTd), text_valid_BT)
        h_image_BPd, h_text_BTd = self.norm2(image_BPd), self.norm2(text_BTd)
        if self.routes_jointly:
            num_patches = image_BPd.shape[1]
            y_BNd, aux = self.mlp(torch.cat([h_image_BPd, h_text_BTd], 1), modality=modality_BN, valid=valid_BN)
            return image_BPd + y_BNd[:, :num_patches], text_BTd + y_BNd[:, num_patches:], [aux]
        y_image_BPd, image_aux = self._mlp(h_image_BPd, IMAGE, None)
        y_text_BTd, text_aux = self._mlp(h_text_BTd, TEXT, text_valid_BT)
        aux = [a for a in (image_aux, text_aux) if a is not None]
        return image_BPd + y_image_BPd, text_BTd + y_text_BTd, aux

    def _mlp(self, h_BNd: torch.Tensor, modality: int, valid_BN: torch.Tensor | None
             ) -> tuple[torch.Tensor, MoeAux | None]:
        if self.is_moe:
            # The router sees the modality of every token (per-modality aux losses) and skips padding.
            return self.mlp(h_BNd, modality=self.moe_modality[modality], valid=valid_BN)
        return self.mlp(h_BNd), None


class Encoder(nn.Module):
    """`depth` blocks (MoE at `moe_layer_ids`) and a final LayerNorm; encodes one modality or pairs in lockstep."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, moe_layer_ids: tuple[int, ...] = (),
                 moe: MoeConfig | None = None, eps: float = 1e-6, paired_init: bool = False):
        super().__init__()
        if moe_layer_ids and moe is None:
            raise ValueError("moe_layer_ids given without a MoeConfig")
        sparse = (paired_moe_mlp if paired_init else moe_mlp)(moe) if moe_layer_ids else None
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_dim, sparse if i in moe_layer_ids else Mlp, eps) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        # Joint MoE calls take a MoE modality id per token (forward_pair); an encoder has one MoeConfig.
        self.moe_modality = moe_modality_ids(moe) if moe_layer_ids else (IMAGE, TEXT)
        # Training memory for compute: keep only each block's input and recompute the rest in the backward.
        self.activation_checkpointing = False

    def _call(self, method: Callable, *args):
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Non-reentrant, with the RNG state kept: the recomputation draws the same router noise, so it
            # routes exactly as the forward did.
            return checkpoint(method, *args, use_reentrant=False)
        return method(*args)

    def forward(self, x_BNd: torch.Tensor, modality: int, valid_BN: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[MoeAux]]:
        aux: list[MoeAux] = []
        for block in self.blocks:
            x_BNd, block_aux = self._call(block, x_BNd, modality, valid_BN)
            if block_aux is not None:
                aux.append(block_aux)
        return self.norm(x_BNd), aux

    def forward_pair(self, image_BPd: torch.Tensor, text_BTd: torch.Tensor, text_valid_BT: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, list[MoeAux]]:
        """Images [B, P, d] and their texts [B, T, d] through every block together (see Block.forward_pair)."""
        if image_BPd.shape[0] != text_BTd.shape[0]:
            raise ValueError(f"pairs need as many texts as images, got {image_BPd.shape[0]} images and "
                             f"{text_BTd.shape[0]} texts")
        B, P = image_BPd.shape[:2]
        device = image_BPd.device
        image_id, text_id = self.moe_modality
        modality_BN = torch.cat([torch.full((B, P), image_id, device=device),
                                 torch.full(text_valid_BT.shape, text_id, device=device)], 1)
        valid_BN = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), text_valid_BT], 1)
        aux: list[MoeAux] = []
        for block in self.blocks:
            image_BPd, text_BTd, block_aux = self._call(block.forward_pair, image_BPd, text_BTd, text_valid_BT,
                                                        modality_BN, valid_BN)
            aux += block_aux
        return self.norm(image_BPd), self.norm(text_BTd), aux
