"""Pre-LN transformer blocks whose MLP is dense or a sparse MoE, and the encoder that stacks them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from limoe.model.mlp import Mlp
from limoe.moe.layer import MoeAux, MoeConfig, MoeMlp


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
        q_BhNc, k_BhNc, v_BhNc = self.qkv(x_BNd).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if valid_BN is None else valid_BN[:, None, None, :]  # [B, 1, 1, N]: True = may attend
        o_BhNc = F.scaled_dot_product_attention(q_BhNc, k_BhNc, v_BhNc, attn_mask=mask)
        return self.out(o_BhNc.transpose(1, 2).reshape(B, N, d))


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)) where MLP is `Mlp` or `MoeMlp`."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, moe: MoeConfig | None = None, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MoeMlp(moe) if moe is not None else Mlp(dim, mlp_dim)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoeMlp)

    def forward(self, x_BNd: torch.Tensor, modality: int, valid_BN: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoeAux | None]:
        x_BNd = x_BNd + self.attn(self.norm1(x_BNd), valid_BN)
        h_BNd = self.norm2(x_BNd)
        if self.is_moe:
            # The router sees the modality of every token (per-modality aux losses) and skips padding.
            y_BNd, aux = self.mlp(h_BNd, modality=modality, valid=valid_BN)
            return x_BNd + y_BNd, aux
        return x_BNd + self.mlp(h_BNd), None


class Encoder(nn.Module):
    """`depth` blocks (MoE at `moe_layer_ids`) and a final LayerNorm; one call encodes one modality."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, moe_layer_ids: tuple[int, ...] = (),
                 moe: MoeConfig | None = None, eps: float = 1e-6):
        super().__init__()
        if moe_layer_ids and moe is None:
            raise ValueError("moe_layer_ids given without a MoeConfig")
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_dim, moe if i in moe_layer_ids else None, eps) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x_BNd: torch.Tensor, modality: int, valid_BN: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[MoeAux]]:
        aux: list[MoeAux] = []
        for block in self.blocks:
            x_BNd, block_aux = block(x_BNd, modality, valid_BN)
            if block_aux is not None:
                aux.append(block_aux)
        return self.norm(x_BNd), aux
