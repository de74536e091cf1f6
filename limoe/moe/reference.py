"""Slow, obviously-correct reference implementations, for tests and as benchmark baselines.

Never used by the model: `route_loop` walks assignments one by one in Python, `expert_choice_loop` lets each
expert pick its tokens of each group in Python loops, `moe_loop` runs each expert on its
tokens in a Python loop, `soft_moe_loop` is Soft MoE one group and one slot at a time, and `moe_onehot_einsum` is the GShard / V-MoE style dispatch with dense one-hot
[S, E, C] tensors that the real layer avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from limoe.deprecation import renamed_arguments
from limoe.moe.experts import ExpertMlps
from limoe.moe.routing import Routing


def route_loop(gates_SE: torch.Tensor, k: int, capacity: int, batch_priority: bool = False,
               valid_S: torch.Tensor | None = None, num_groups: int = 1,
               capacity_G: list[int] | None = None) -> Routing:
    """`route` written as the V-MoE description reads: Python loops over groups, choice ranks and tokens."""
    num_tokens, num_experts = gates_SE.shape
    # each token's k best experts, equal gates lowest expert first (Python's sort is stable)
    rows = gates_SE.detach().tolist()
    expert_SK = torch.tensor([sorted(range(num_experts), key=lambda e: -row[e])[:k] for row in rows],
                             dtype=torch.long).view(num_tokens, k)
    gate_SK = gates_SE.gather(1, expert_SK)
    valid = [True] * num_tokens if valid_S is None else [bool(v) for v in valid_S]
    slot_SK = torch.full((num_tokens, k), -1, dtype=torch.long)
    kept_SK = torch.zeros(num_tokens, k, dtype=torch.bool)
    per_group = num_tokens // num_groups
    for g in range(num_groups):
        tokens = list(range(g * per_group, (g + 1) * per_group))
        if batch_priority:
            tokens.sort(key=lambda s: -float(gate_SK[s, 0].detach()))  # stable: ties keep token order
        limit = capacity if capacity_G is None else capacity_G[g]
        used = [0] * num_experts
        for choice in range(k):
            for s in tokens:
                if valid[s]:
                    e = int(expert_SK[s, choice])
                    slot_SK[s, choice] = used[e]
                    kept_SK[s, choice] = used[e] < limit
                    used[e] += 1
    return Routing(expert_SK, slot_SK, gate_SK, kept_SK, capacity, num_experts, num_groups)


def expert_choice_loop(p_SE: torch.Tensor, capacity: int, valid_S: torch.Tensor | None = None,
                       num_groups: int = 1) -> Routing:
    """Expert choice as the paper reads: in each group, each expert sorts the group's valid tokens by p(e | token)
    (ties: token order) and takes the first `capacity`; slot = place in that order, gate = p(e | token)."""
    num_tokens, num_experts = p_SE.shape
    valid = [True] * num_tokens if valid_S is None else [bool(v) for v in valid_S]
    slot_SE = torch.full((num_tokens, num_experts), capacity, dtype=torch.long)
    kept_SE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    per_group = num_tokens // num_groups
    for g in range(num_groups):
        tokens = [s for s in range(g * per_group, (g + 1) * per_group) if valid[s]]
        for e in range(num_experts):
            ranked = sorted(tokens, key=lambda s: -float(p_SE[s, e].detach()))
            for slot, s in enumerate(ranked[:capacity]):
                slot_SE[s, e] = slot
                kept_SE[s, e] = True
    for s in range(num_tokens):
        if not valid[s]:
            slot_SE[s] = -1
    expert_SE = torch.arange(num_experts).expand(num_tokens, num_experts)
    return Routing(expert_SE, slot_SE, p_SE, kept_SE, capacity, num_experts, num_groups, ranked=False)


def _expert_mlp(experts: ExpertMlps, e: int, x_Rd: torch.Tensor) -> torch.Tensor:
    h_Rh = F.gelu(x_Rd @ experts.w_in_Edh[e] + experts.b_in_Eh[e])
    return h_Rh @ experts.w_out_Ehd[e] + experts.b_out_Ed[e]


def moe_loop(experts: ExpertMlps, x_Sd: torch.Tensor, routing: Routing) -> torch.Tensor:
    """For each expert, run its MLP on the tokens it kept and add gate * output to those tokens."""
    y_Sd = torch.zeros_like(x_Sd)
    for e in range(experts.num_experts):
        for choice in range(routing.k):
            mask_S = routing.kept_SK[:, choice] & (routing.expert_SK[:, choice] == e)
            if mask_S.any():
                gate_R = routing.gate_SK[mask_S, choice]
                y_Sd = y_Sd.index_add(0, mask_S.nonzero()[:, 0], gate_R[:, None] * _expert_mlp(experts, e, x_Sd[mask_S]))
    return y_Sd


def moe_onehot_einsum(experts: ExpertMlps, x_Sd: torch.Tensor, routing: Routing) -> torch.Tensor:
    """GShard / V-MoE style: dense dispatch and combine tensors [S, E, C] contracted with einsum."""
    num_experts, cap = routing.num_experts, routing.capacity
    slot_SK = routing.slot_SK.clamp(0, cap - 1)
    dispatch_SKEC = (F.one_hot(routing.expert_SK, num_experts)[..., None]
                     * F.one_hot(slot_SK, cap)[..., None, :]
                     * routing.kept_SK[..., None, None]).to(x_Sd.dtype)
    dispatch_SEC = dispatch_SKEC.sum(1)
    combine_SEC = (dispatch_SKEC * routing.gate_SK[..., None, None].to(x_Sd.dtype)).sum(1)
    x_ECd = torch.einsum("sec,sd->ecd", dispatch_SEC, x_Sd)
    return torch.einsum("sec,ecd->sd", combine_SEC, experts(x_ECd))


@renamed_arguments(phi_dN="phi_dZ")
def soft_moe_loop(experts: ExpertMlps, x_Sd: torch.Tensor, phi_dZ: torch.Tensor, scale: torch.Tensor,
                  valid_S: torch.Tensor | None = None, num_groups: int = 1) -> torch.Tensor:
    """Soft MoE as the paper reads, per group and per slot: slot z (of expert z // p) takes the softmax over the
    group's valid tokens of their logits scale * <x / |x|, phi_z / |phi_z|> as weights of its input; each valid
    token's output is the softmax over the slots of its logits, weighting the slots' outputs; padding gets 0.
    |v| is V-MoE's sqrt(sum v^2 + 1e-6)."""
    num_tokens, dim = x_Sd.shape
    num_slots = phi_dZ.shape[1]
    per_expert = num_slots // experts.num_experts
    per_group = num_tokens // num_groups
    valid = [True] * num_tokens if valid_S is None else [bool(v) for v in valid_S]
    phi_unit_dZ = phi_dZ / (phi_dZ.square().sum(0, keepdim=True) + 1e-6).sqrt()
    rows = [x_Sd.new_zeros(dim) for _ in range(num_tokens)]
    for g in range(num_groups):
        tokens = [s for s in range(g * per_group, (g + 1) * per_group) if valid[s]]
        if not tokens:
            continue
        x_md = x_Sd[tokens]
        logits_mZ = scale * (x_md / (x_md.square().sum(1, keepdim=True) + 1e-6).sqrt()) @ phi_unit_dZ
        slot_out = []
        for z in range(num_slots):
            weight_m = torch.softmax(logits_mZ[:, z], dim=0)
            slot_in_d = (weight_m[:, None] * x_md).sum(0)
            slot_out.append(_expert_mlp(experts, z // per_expert, slot_in_d[None])[0])
        y_Zd = torch.stack(slot_out)
        for i, s in enumerate(tokens):
            rows[s] = (torch.softmax(logits_mZ[i], dim=0)[:, None] * y_Zd).sum(0)
    return torch.stack(rows)
