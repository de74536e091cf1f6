"""Top-k routing with expert capacity and Batch Priority Routing, as index tensors, per routing group.

Semantics follow V-MoE's "top experts per item" dispatcher, applied to each routing group on its own: every
token's k-th choice claims a slot only after all tokens' (k-1)-th choices of its group; within one choice rank
tokens go in their order, or by descending top-1 gate with Batch Priority Routing (BPR). An assignment is kept
iff its slot (the running count of earlier assignments of the same group to the same expert) is below the
capacity. All groups are routed at once: a (group, expert) pair is one bucket, so the slot of an assignment is
its rank in its bucket. Everything is O(S*K) indices plus one stable sort; no [S, E, C] tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from limoe.deprecation import renamed_attribute

CAPACITY_ROUNDINGS = ("ceil", "round")


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, multiple_of: int = 4,
             rounding: str = "ceil") -> int:
    """Slots per expert, as V-MoE's `compute_capacity`: num_tokens * k * capacity_factor / num_experts, rounded up
    ("ceil") or to the nearest integer ("round", Python's: halves to even, as V-MoE's), then up to `multiple_of`."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    if rounding not in CAPACITY_ROUNDINGS:
        raise ValueError(f"rounding must be one of {CAPACITY_ROUNDINGS}, got {rounding!r}")
    exact = num_tokens * k * capacity_factor / num_experts
    slots = math.ceil(exact) if rounding == "ceil" else round(exact)
    if slots < 1:
        raise ValueError(f"capacity must be >= 1, got {slots} for num_tokens={num_tokens}, "
                         f"num_experts={num_experts}, k={k}, capacity_factor={capacity_factor} ({rounding})")
    return -(-slots // multiple_of) * multiple_of


def top_k_lowest_first(scores: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along `dim`, largest first, equal values lowest index first (as
    JAX's `lax.top_k`, which V-MoE routes with). `torch.topk` leaves the order of ties to the backend; `max`
    (documented: the first maximal value) and a stable descending sort do not. No host sync."""
    if k == 1:  # the common case, and faster than topk
        values, indices = scores.max(dim=dim, keepdim=True)
        return values, indices
    values, indices = torch.sort(scores, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def group_ids(num_tokens: int, num_groups: int, device: torch.device | None = None) -> torch.Tensor:
    """The routing group of each of `num_tokens` tokens forming `num_groups` groups of consecutive tokens: [S]."""
    return torch.arange(num_tokens, device=device) // (num_tokens // num_groups)


@dataclass
class Routing:
    """Where each token's k choices go. All tensors are [S, K]; slot is -1 for invalid (padding) tokens.

    The S tokens form `num_groups` routing groups of S / num_groups consecutive tokens each.
    """

    expert_SK: torch.Tensor  # long: chosen expert, k-th best in column k
    slot_SK: torch.Tensor  # long: position in that expert's buffer of the token's group (>= capacity: dropped)
    gate_SK: torch.Tensor  # float: gate of that choice, not renormalised over the k choices
    kept_SK: torch.Tensor  # bool: slot < its group's capacity and the token is valid
    capacity: int  # slots per expert and group (the largest, if groups differ: see `route`)
    num_experts: int
    num_groups: int = 1
    # Column k is each token's k-th best choice (top_k). False: the columns are the E experts themselves
    # (expert choice), a token may be kept by any number of them and column 0 is no top choice.
    ranked: bool = True

    @property
    def k(self) -> int:
        return self.expert_SK.shape[1]

    @property
    def group_S(self) -> torch.Tensor:
        """The routing group of every token: [S] long."""
        return group_ids(self.expert_SK.shape[0], self.num_groups, self.expert_SK.device)

    def buffer_row_SK(self) -> torch.Tensor:
        """Row of each assignment in expert-major [E, G * C] buffers: expert e holds its C slots of every group."""
        cap = self.capacity
        return self.expert_SK * (self.num_groups * cap) + self.group_S[:, None] * cap + self.slot_SK

    def token_slice(self, num_tokens: int) -> "Routing":
        """The first `num_tokens` tokens (e.g. without the padding examples that filled the last group)."""
        return Routing(self.expert_SK[:num_tokens], self.slot_SK[:num_tokens], self.gate_SK[:num_tokens],
                       self.kept_SK[:num_tokens], self.capacity, self.num_experts, self.num_groups, self.ranked)


@dataclass
class SoftRouting(Routing):
    """Soft MoE's routing (limoe.moe.routers.soft): every slot mixes the tokens of its group, every token mixes the
    slots. The dispatcher moves tokens by the two weight matrices alone, [S, Z] with Z = E * capacity slots of the
    token's group, expert-major (slot z belongs to expert z // capacity):
    - dispatch_SZ[:, z] sums to 1 over the valid tokens of each group (a group without any: all 0);
    - combine_SZ[s] sums to 1 over the slots for a valid token s, and is 0 for padding.
    The Routing fields summarise it for the statistics and `limoe analyze`: K = 1 column, each token's expert with
    the largest combine weight (summed over that expert's slots), gate = that weight, kept = valid (nothing drops),
    slot 0 (-1 for padding).
    """

    dispatch_SZ: torch.Tensor | None = None
    combine_SZ: torch.Tensor | None = None

    dispatch_SN = renamed_attribute("dispatch_SZ")
    combine_SN = renamed_attribute("combine_SZ")

    def token_slice(self, num_tokens: int) -> "SoftRouting":
        return SoftRouting(self.expert_SK[:num_tokens], self.slot_SK[:num_tokens], self.gate_SK[:num_tokens],
                           self.kept_SK[:num_tokens], self.capacity, self.num_experts, self.num_groups, self.ranked,
                           self.dispatch_SZ[:num_tokens], self.combine_SZ[:num_tokens])



def route(
    gates_SE: torch.Tensor,
    k: int,
    capacity: int,
    batch_priority: bool = False,
    valid_S: torch.Tensor | None = None,
    num_groups: int = 1,
    capacity_G: torch.Tensor | None = None,
) -> Routing:
    """Assign each token's top-k experts to capacity slots of its group (see module docstring for the order).

    The S tokens are `num_groups` groups of consecutive tokens. `capacity` is the slots per expert of every
    group, or, with `capacity_G` (long [G], each <= capacity), of group g.
    """
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
    if num_groups < 1 or num_tokens % num_groups:
        raise ValueError(f"num_groups must be >= 1 and divide the {num_tokens} tokens, got {num_groups}")
    if capacity_G is not None and capacity_G.shape != (num_groups,):
        raise ValueError(f"capacity_G must have shape ({num_groups},), got {tuple(capacity_G.shape)}")

    gate_SK, expert_SK = top_k_lowest_first(gates_SE, k, dim=1)  # column 0 is the top-1 choice
    device = gates_SE.device
    if batch_priority:
        # One stable sort of all tokens: restricted to one group it is that group's own priority order (equal
        # top-1 gates keep token order), so groups need no sort of their own.
        order_S = torch.sort(gate_SK[:, 0].detach(), descending=True, stable=True).indices
    else:
        order_S = torch.arange(num_tokens, device=device)

    # Assignments in the order they claim slots: choice-major, then token priority. Bucket = (group, expert);
    # invalid tokens go to a sentinel bucket G*E so that they take no slot.
    num_buckets = num_groups * num_experts
    group_S = group_ids(num_tokens, num_groups, device)
    bucket_KS = (group_S[:, None] * num_experts + expert_SK)[order_S].T
    if valid_S is not None:
        bucket_KS = torch.where(valid_S[order_S], bucket_KS, num_buckets)
    bucket_A = bucket_KS.reshape(-1)  # A = K*S assignments
    sorted_bucket_A, perm_A = torch.sort(bucket_A, stable=True)
    # Bucket sizes by scatter-add (bincount would need a host sync for its output size on accelerators); both
    # [G * E + 1].
    bucket_count = torch.zeros(num_buckets + 1, dtype=torch.long, device=device)
    bucket_count.scatter_add_(0, bucket_A, torch.ones_like(bucket_A))
    bucket_start = torch.cumsum(bucket_count, 0) - bucket_count
    rank_sorted_A = torch.arange(bucket_A.numel(), device=device) - bucket_start[sorted_bucket_A]
    slot_A = torch.empty_like(rank_sorted_A).scatter_(0, perm_A, rank_sorted_A)

    slot_SK = torch.empty_like(expert_SK)
    slot_SK[order_S] = slot_A.view(k, num_tokens).T
    kept_SK = slot_SK < (capacity if capacity_G is None else capacity_G[group_S][:, None])
    if valid_S is not None:
        kept_SK &= valid_S[:, None]
        slot_SK = torch.where(valid_S[:, None], slot_SK, -1)
    return Routing(expert_SK, slot_SK, gate_SK, kept_SK, capacity, num_experts, num_groups)
