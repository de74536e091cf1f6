"""Top-k routing with expert capacity and Batch Priority Routing, as index tensors.

Semantics follow V-MoE's "top experts per item" dispatcher: every token's k-th choice claims a slot only after
all tokens' (k-1)-th choices; within one choice rank tokens go in their order, or by descending top-1 gate with
Batch Priority Routing (BPR). An assignment is kept iff its slot (the running count of earlier assignments to
the same expert) is below the capacity. Everything is O(S*K) indices plus one stable sort; no [S, E, C] tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, multiple_of: int = 4) -> int:
    """Slots per expert: ceil(num_tokens * k * capacity_factor / num_experts), rounded up to `multiple_of`."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    slots = math.ceil(num_tokens * k * capacity_factor / num_experts)
    slots = -(-slots // multiple_of) * multiple_of
    if slots < 1:
        raise ValueError(f"capacity must be >= 1, got {slots} for num_tokens={num_tokens}")
    return slots


@dataclass
class Routing:
    """Where each token's k choices go. All tensors are [S, K]; slot is -1 for invalid (padding) tokens."""

    expert_SK: torch.Tensor  # long: chosen expert, k-th best in column k
    slot_SK: torch.Tensor  # long: position in that expert's buffer (>= capacity means dropped)
    gate_SK: torch.Tensor  # float: gate of that choice, not renormalised over the k choices
    kept_SK: torch.Tensor  # bool: slot < capacity and the token is valid
    capacity: int
    num_experts: int

    @property
    def k(self) -> int:
        return self.expert_SK.shape[1]


def route(
    gates_SE: torch.Tensor,
    k: int,
    capacity: int,
    batch_priority: bool = False,
    valid_S: torch.Tensor | None = None,
) -> Routing:
    """Assign each token's top-k experts to capacity slots (see module docstring for the order)."""
    if gates_SE.dim() != 2:
        raise ValueError(f"gates_SE must be 2-D [tokens, experts], got shape {tuple(gates_SE.shape)}")
    num_tokens, num_experts = gates_SE.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if valid_S is not None and (valid_S.shape != (num_tokens,) or valid_S.dtype != torch.bool):
        raise ValueError(f"valid_S must be a bool tensor of shape ({num_tokens},), got "
                         f"{valid_S.dtype} {tuple(valid_S.shape)}")

    gate_SK, expert_SK = gates_SE.topk(k, dim=1)  # sorted: column 0 is the top-1 choice
    device = gates_SE.device
    if batch_priority:
        # Stable sort: equal top-1 gates keep token order.
        order_S = torch.sort(gate_SK[:, 0].detach(), descending=True, stable=True).indices
    else:
        order_S = torch.arange(num_tokens, device=device)

    # Assignments in the order they claim slots: choice-major, then token priority. Invalid tokens go to a
    # sentinel bucket E so that they take no slot.
    bucket_KS = expert_SK[order_S].T
    if valid_S is not None:
        bucket_KS = torch.where(valid_S[order_S], bucket_KS, num_experts)
    bucket_A = bucket_KS.reshape(-1)  # A = K*S assignments
    sorted_bucket_A, perm_A = torch.sort(bucket_A, stable=True)
    # Bucket sizes by scatter-add (bincount would need a host sync for its output size on accelerators).
    count_B = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    count_B.scatter_add_(0, bucket_A, torch.ones_like(bucket_A))
    start_B = torch.cumsum(count_B, 0) - count_B
    rank_sorted_A = torch.arange(bucket_A.numel(), device=device) - start_B[sorted_bucket_A]
    slot_A = torch.empty_like(rank_sorted_A).scatter_(0, perm_A, rank_sorted_A)

    slot_SK = torch.empty_like(expert_SK)
    slot_SK[order_S] = slot_A.view(k, num_tokens).T
    kept_SK = slot_SK < capacity
    if valid_S is not None:
        kept_SK &= valid_S[:, None]
        slot_SK = torch.where(valid_S[:, None], slot_SK, -1)
    return Routing(expert_SK, slot_SK, gate_SK, kept_SK, capacity, num_experts)
