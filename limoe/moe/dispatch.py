"""The dispatcher: tokens to expert rows and back. y_Sd = dispatcher(x_Sd, routing, experts).

It gathers each kept assignment's token into its expert's rows, runs the experts on those rows and gathers the
outputs back, weighted by gate. Two row layouts, one per expert backend (limoe.moe.experts):
- padded (``bmm``): [E, G*C, d] buffers, expert e's C slots of every routing group; `run_experts` multiplies them,
  the hook where expert parallelism exchanges the buffers between ranks (limoe.moe.parallel).
- packed (``grouped_mm``): expert e's kept assignments fill one block of rows of an [R, d] buffer
  (`packed_rows`), run by grouped GEMMs, so empty slots cost no FLOPs.
Soft MoE (`SoftRouting`) mixes instead of gathering: slot inputs are weighted sums of their group's tokens, in
the padded [E, G*C, d] buffers (every slot is filled, so packing would save nothing), run by `run_experts`.
"""

from __future__ import annotations

import torch
from torch import nn

from limoe.moe.experts import (GROUP_ROW_ALIGN, ExpertMlps, check_expert_backend, compute_dtype,
                               resolve_expert_backend)
from limoe.moe.routing import Routing, SoftRouting


def packed_rows(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Packed layout: expert e's kept assignments fill one block of rows, its routing groups back to back.

    Within a routing group g, kept slots of expert e are exactly 0 .. count_ge - 1, so an assignment's row is
    start_e + (kept assignments of e in groups before g) + slot, and e's block needs count_e rows, rounded up
    to GROUP_ROW_ALIGN. Returns each assignment's row, the int32 cumulative block ends (grouped_mm's
    offsets) and the buffer's row count, a static bound (E * G*C rounded up), so shapes never depend on data.
    """
    num_experts, num_groups, align = routing.num_experts, routing.num_groups, GROUP_ROW_ALIGN
    group_S = routing.group_S
    count_GE = torch.zeros(num_groups * num_experts, dtype=torch.long, device=routing.expert_SK.device)
    count_GE.scatter_add_(0, (group_S[:, None] * num_experts + routing.expert_SK).reshape(-1),
                          routing.kept_SK.reshape(-1).long())
    count_GE = count_GE.view(num_groups, num_experts)
    rows_E = (count_GE.sum(0) + align - 1) // align * align
    group_end_E = torch.cumsum(rows_E, 0)
    before_GE = torch.cumsum(count_GE, 0) - count_GE
    kept_row_SK = ((group_end_E - rows_E)[routing.expert_SK] + before_GE[group_S[:, None], routing.expert_SK]
                   + routing.slot_SK)
    num_rows = num_experts * (-(-num_groups * routing.capacity // align) * align)
    return kept_row_SK, group_end_E.int(), num_rows


class Dispatcher(nn.Module):
    """Gather -> experts -> combine for one MoE layer; `expert_backend` picks the row layout (see module doc)."""

    def __init__(self, expert_backend: str = "auto"):
        super().__init__()
        check_expert_backend(expert_backend)
        self.expert_backend = expert_backend

    def extra_repr(self) -> str:
        return f"expert_backend={self.expert_backend}"

    def uses_grouped_mm(self, x_Sd: torch.Tensor, experts: ExpertMlps) -> bool:
        """Whether this call packs rows for grouped GEMMs: the backend as resolved for x's device and dtype."""
        backend = resolve_expert_backend(self.expert_backend, x_Sd.device, compute_dtype(x_Sd), experts.dim,
                                         experts.hidden_dim)
        return backend == "grouped_mm"

    def forward(self, x_Sd: torch.Tensor, routing: Routing, experts: ExpertMlps) -> torch.Tensor:
        """Tokens [S, d] -> sum over each token's kept choices of gate * expert output: [S, d].

        Empty buffer rows and dropped assignments point at row 0 instead of a zero row: nothing reads an empty
        row's output (so its gradient is exactly 0) and a dropped choice has weight 0. This saves padding copies
        of the activations in both directions.
        """
        if isinstance(routing, SoftRouting):
            return self.forward_soft(x_Sd, routing, experts)
        num_tokens, dim = x_Sd.shape
        num_experts, slots = routing.num_experts, routing.num_groups * routing.capacity
        if self.uses_grouped_mm(x_Sd, experts):
            kept_row_SK, group_end_E, num_rows = packed_rows(routing)
        else:
            kept_row_SK, group_end_E, num_rows = routing.buffer_row_SK(), None, num_experts * slots
        # Source token of every buffer row. Dropped assignments write a spare row (num_rows) that is cut off.
        token_SK = torch.arange(num_tokens, device=x_Sd.device)[:, None].expand_as(kept_row_SK)
        source_row = torch.zeros(num_rows + 1, dtype=torch.long, device=x_Sd.device)
        source_row.scatter_(0, torch.where(routing.kept_SK, kept_row_SK, num_rows).reshape(-1),
                            token_SK.reshape(-1))
        # index_select, not x[idx]: its backward is index_add, much faster on CPU than an accumulating index_put.
        x_Rd = x_Sd.index_select(0, source_row[:num_rows])

        if group_end_E is not None:
            y_Rd = experts.forward_grouped(x_Rd, group_end_E)
        else:
            y_Rd = self.run_experts(experts, x_Rd.view(num_experts, slots, dim)).view(num_rows, dim)

        row_SK = torch.where(routing.kept_SK, kept_row_SK, 0)
        weight_SK = (routing.gate_SK * routing.kept_SK).to(y_Rd.dtype)
        if routing.k == 1:  # skip the [S, K, d] intermediate in the common case
            return y_Rd.index_select(0, row_SK[:, 0]) * weight_SK
        y_SKd = y_Rd.index_select(0, row_SK.reshape(-1)).view(num_tokens, routing.k, dim)
        return torch.einsum("skd,sk->sd", y_SKd, weight_SK)

    def forward_soft(self, x_Sd: torch.Tensor, routing: SoftRouting, experts: ExpertMlps) -> torch.Tensor:
        """Soft MoE: slot inputs D^T X per group, the experts on [E, G*p, d] buffers, y = C Y per group."""
        num_tokens, dim = x_Sd.shape
        num_experts, num_groups, per_expert = routing.num_experts, routing.num_groups, routing.capacity
        num_slots = num_experts * per_expert
        dtype = compute_dtype(x_Sd)  # the dispatch and combine matmuls run in the experts' dtype
        dispatch_GmZ = routing.dispatch_SZ.view(num_groups, -1, num_slots).to(dtype)
        x_GZd = torch.bmm(dispatch_GmZ.transpose(1, 2), x_Sd.view(num_groups, -1, dim).to(dtype))
        # Group-major slots -> expert-major buffers: expert e's p slots of every group, as `run_experts` expects.
        x_EGpd = x_GZd.view(num_groups, num_experts, per_expert, dim).transpose(0, 1)
        y_EGpd = self.run_experts(experts, x_EGpd.reshape(num_experts, num_groups * per_expert, dim))
        y_GZd = y_EGpd.view(num_experts, num_groups, per_expert, dim).transpose(0, 1)
        y_GZd = y_GZd.reshape(num_groups, num_slots, dim)
        combine_GmZ = routing.combine_SZ.view(num_groups, -1, num_slots).to(y_GZd.dtype)
        return torch.bmm(combine_GmZ, y_GZd).view(num_tokens, dim)

    def run_experts(self, experts: ExpertMlps, x_ECd: torch.Tensor) -> torch.Tensor:
        """All E experts on their padded buffers [E, C, d] (C = every group's slots). Expert parallelism
        overrides this to exchange the buffers."""
        return experts(x_ECd)
