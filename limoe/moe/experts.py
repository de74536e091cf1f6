"""E expert MLPs with stacked weights, and the two ways the layer runs them ("expert backends").

- ``bmm`` (every device and dtype): tokens sit in capacity-padded [E, C, d] buffers and two batched matmuls
  run all E*C rows, empty slots included.
- ``grouped_mm`` (CUDA sm90/sm100, bf16): the dispatch packs each expert's kept tokens into one contiguous
  group of rows of an [R, d] buffer and ``torch._grouped_mm`` multiplies each group by its expert's weights,
  so empty slots cost no FLOPs.

Grouped GEMM is used only on the packed layout: on the padded [E, C, d] buffers every group has C rows and
it computes exactly what ``bmm`` computes, which cuBLAS's batched GEMM already does well. What it can save
is the padding: at capacity factor 1.0 the empty slots equal the dropped assignments (a few percent at
init, more once the router specialises), at factors 1.25-2 (eval, text) 20-50% of the rows. ``grouped_mm`` is
allowed on CUDA only where its fused kernel runs; elsewhere torch falls back to a loop over groups that copies
the offsets to the host, a host-device sync on every call. ``auto`` means ``bmm`` for now: the grouped path has
been checked on CPU only, and becomes the CUDA default once a GPU run shows it correct and faster.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_BACKENDS = ("auto", "bmm", "grouped_mm")
# Each expert's group of rows starts at a multiple of 8: with bf16 every group's first row is 16-byte aligned
# in every operand layout the forward and backward grouped GEMMs use (TMA needs 16-byte aligned addresses).
GROUP_ROW_ALIGN = 8


def check_expert_backend(name: str) -> None:
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"expert_backend must be one of {EXPERT_BACKENDS}, got {name!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def grouped_mm_is_fast(device: torch.device, dtype: torch.dtype, dim: int, hidden_dim: int) -> bool:
    """Whether torch._grouped_mm runs its fused CUTLASS kernel (no host sync) for these operands."""
    return (hasattr(torch, "_grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16
            and dim % 8 == 0 and hidden_dim % 8 == 0
            and torch.cuda.get_device_properties(device).major in (9, 10))


def resolve_expert_backend(backend: str, device: torch.device, dtype: torch.dtype, dim: int, hidden_dim: int) -> str:
    """"bmm" or "grouped_mm" for a layer whose experts compute in `dtype` on `device`."""
    check_expert_backend(backend)
    if backend == "auto":
        return "bmm"  # until the grouped path has been checked and timed on a GPU (see the module docstring)
    if backend == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"expert_backend='grouped_mm' needs torch._grouped_mm (torch >= 2.8), "
                             f"this is torch {torch.__version__}")
        if device.type == "cuda" and not grouped_mm_is_fast(device, dtype, dim, hidden_dim):
            # torch would fall back to a loop that syncs with the host on every call: refuse instead.
            raise ValueError(f"expert_backend='grouped_mm' on CUDA needs bf16 (autocast), an sm90/sm100 GPU and "
                             f"dim, hidden_dim multiples of 8; got {dtype}, dim={dim}, hidden_dim={hidden_dim}; "
                             f"use 'auto' or 'bmm'")
    return backend


class ExpertMlps(nn.Module):
    """E independent two-layer GELU MLPs d -> h -> d, stored as [E, d, h] and [E, h, d] weights."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, shared_init: bool = True):
        super().__init__()
        self.shared_init = shared_init
        self.w_in_Edh = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b_in_Eh = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w_out_Ehd = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_out_Ed = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert is initialised like a ViT MLP: Xavier-uniform kernels, zero biases; with shared_init every
        # expert gets expert 0's draw (V-MoE's default).
        for w in (self.w_in_Edh, self.w_out_Ehd):
            fan_in, fan_out = w.shape[1], w.shape[2]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            with torch.no_grad():
                if self.shared_init:
                    w.copy_(torch.empty_like(w[0]).uniform_(-bound, bound).expand_as(w))
                else:
                    nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.b_in_Eh)
        nn.init.zeros_(self.b_out_Ed)

    def extra_repr(self) -> str:
        num_experts, dim, hidden_dim = self.w_in_Edh.shape
        return f"num_experts={num_experts}, dim={dim}, hidden_dim={hidden_dim}"

    @property
    def num_experts(self) -> int:
        return self.w_in_Edh.shape[0]

    @property
    def dim(self) -> int:
        return self.w_in_Edh.shape[1]

    @property
    def hidden_dim(self) -> int:
        return self.w_in_Edh.shape[2]

    def forward(self, x_ECd: torch.Tensor) -> torch.Tensor:
        """Capacity-padded buffers [E, C, d] -> [E, C, d] with batched matmuls (the bmm backend)."""
        h_ECh = F.gelu(torch.baddbmm(self.b_in_Eh[:, None, :].to(x_ECd.dtype), x_ECd, self.w_in_Edh.to(x_ECd.dtype)))
        return torch.baddbmm(self.b_out_Ed[:, None, :].to(h_ECh.dtype), h_ECh, self.w_out_Ehd.to(h_ECh.dtype))

    def forward_grouped(self, x_Rd: torch.Tensor, group_end_E: torch.Tensor) -> torch.Tensor:
        """Packed rows [R, d] -> [R, d] with grouped GEMMs (the grouped_mm backend).

        Expert e owns rows [group_end_E[e-1], group_end_E[e]) (int32, cumulative). torch._grouped_mm never
        computes rows past the last group: their outputs, and the input gradients it returns for them, are
        uninitialised memory (NaN seen on CPU). Every such row is therefore cut with `where` (not a multiply:
        NaN * 0 is NaN) before anything reduces over rows, so those rows are exact zeros and pass no gradient.
        """
        num_experts = self.num_experts
        dtype = compute_dtype(x_Rd)  # _grouped_mm is not an autocast op: cast by hand
        row_R = torch.arange(x_Rd.shape[0], device=x_Rd.device, dtype=group_end_E.dtype)
        expert_R = torch.searchsorted(group_end_E, row_R, right=True)  # E for rows past the last group
        in_group_R1 = (expert_R < num_experts)[:, None]
        # Biases by a one-hot matmul, added in place (addmm_: no extra pass over the [R, h] activations). Its
        # backward is a GEMM over rows; indexing the bias by expert_R would backpropagate with atomic adds of R
        # rows into E rows, heavily contended.
        onehot_RE = (expert_R[:, None] == torch.arange(num_experts, device=x_Rd.device)).to(dtype)
        x_Rd = torch.where(in_group_R1, x_Rd.to(dtype), 0)
        h_Rh = torch._grouped_mm(x_Rd, self.w_in_Edh.to(dtype), offs=group_end_E)
        h_Rh = F.gelu(torch.where(in_group_R1, h_Rh.addmm_(onehot_RE, self.b_in_Eh.to(dtype)), 0))
        y_Rd = torch._grouped_mm(h_Rh, self.w_out_Ehd.to(dtype), offs=group_end_E)
        return torch.where(in_group_R1, y_Rd.addmm_(onehot_RE, self.b_out_Ed.to(dtype)), 0)
