"""E expert MLPs with stacked weights, applied to capacity buffers with batched matmuls."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMlps(nn.Module):
    """E independent two-layer GELU MLPs d -> h -> d, stored as [E, d, h] and [E, h, d] weights."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w_in_Edh = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b_in_Eh = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w_out_Ehd = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_out_Ed = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert is initialised like a ViT MLP: Xavier-uniform kernels, zero biases.
        for w in (self.w_in_Edh, self.w_out_Ehd):
            fan_in, fan_out = w.shape[1], w.shape[2]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.b_in_Eh)
        nn.init.zeros_(self.b_out_Ed)

    def extra_repr(self) -> str:
        num_experts, dim, hidden_dim = self.w_in_Edh.shape
        return f"num_experts={num_experts}, dim={dim}, hidden_dim={hidden_dim}"

    @property
    def num_experts(self) -> int:
        return self.w_in_Edh.shape[0]

    def forward(self, x_ECd: torch.Tensor) -> torch.Tensor:
        h_ECh = F.gelu(torch.baddbmm(self.b_in_Eh[:, None, :].to(x_ECd.dtype), x_ECd, self.w_in_Edh.to(x_ECd.dtype)))
        return torch.baddbmm(self.b_out_Ed[:, None, :].to(h_ECh.dtype), h_ECh, self.w_out_Ehd.to(h_ECh.dtype))
