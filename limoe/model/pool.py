"""Pooling heads: token sequence [B, N, d] (+ validity mask) -> one vector per example [B, d]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from limoe.model.mlp import Mlp


class MapHead(nn.Module):
    """Multi-head attention pooling (big_vision MAPHead): a learned query attends over the tokens, then MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.probe_11d = nn.Parameter(torch.empty(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)
        nn.init.xavier_uniform_(self.probe_11d.view(1, dim))
        for layer in (self.q, self.kv, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_BNd: torch.Tensor, valid_BN: torch.Tensor | None = None) -> torch.Tensor:
        B, N, d = x_BNd.shape
        c = d // self.heads
        q_Ba1c = self.q(self.probe_11d).view(1, 1, self.heads, c).transpose(1, 2).expand(B, -1, -1, -1)
        k_BaNc, v_BaNc = self.kv(x_BNd).view(B, N, 2, self.heads, c).permute(2, 0, 3, 1, 4)
        mask = None if valid_BN is None else valid_BN[:, None, None, :]
        o_Bd = self.out(F.scaled_dot_product_attention(q_Ba1c, k_BaNc, v_BaNc, attn_mask=mask).reshape(B, d))
        return o_Bd + self.mlp(self.norm(o_Bd))


class MeanPool(nn.Module):
    """Average of the valid tokens."""

    def forward(self, x_BNd: torch.Tensor, valid_BN: torch.Tensor | None = None) -> torch.Tensor:
        if valid_BN is None:
            return x_BNd.mean(1)
        w_BN1 = valid_BN[..., None].to(x_BNd.dtype)
        return (x_BNd * w_BN1).sum(1) / w_BN1.sum(1).clamp_min(1.0)


class LastPool(nn.Module):
    """The last valid token (EOS for right-padded text; the last patch for images)."""

    def forward(self, x_BNd: torch.Tensor, valid_BN: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x_BNd.shape
        if valid_BN is None:
            return x_BNd[:, -1]
        last_B = (valid_BN.long() * torch.arange(N, device=x_BNd.device)).amax(1)
        return x_BNd[torch.arange(B, device=x_BNd.device), last_B]


def make_pool(kind: str, dim: int, heads: int, mlp_dim: int, eps: float = 1e-6) -> nn.Module:
    if kind == "map":
        return MapHead(dim, heads, mlp_dim, eps)
    if kind == "mean":
        return MeanPool()
    if kind == "last":
        return LastPool()
    raise ValueError(f"pooling must be 'map', 'mean' or 'last', got {kind!r}")
