"""The dense transformer MLP: the baseline every MoE layer is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """d -> h -> d with GELU, initialised like one expert of `ExpertMlps` (Xavier-uniform, zero bias)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden_dim)
        self.fc_out = nn.Linear(hidden_dim, dim)
        for layer in (self.fc_in, self.fc_out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))
