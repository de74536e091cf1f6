"""The sparse MoE MLP: router -> top-k routing with capacity (and BPR) per group -> dispatch -> experts -> combine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from limoe.checks import check_fields, flag, integer, one_of, option, real, sequence, text
from limoe.moe import losses
from limoe.moe.experts import (EXPERT_BACKENDS, GROUP_ROW_ALIGN, ExpertMlps, compute_dtype,
                               resolve_expert_backend)
from limoe.moe.routing import Routing, capacity, route
from limoe.moe.stats import MoeStats


ROUTING_GROUPS = ("joint", "per_modality")


def _distinct_names(names: tuple[str, ...]) -> str | None:
    return None if names and len(set(names)) == len(names) else f"must be distinct names, got {tuple(names)}"


@dataclass
class MoeConfig:
    dim: int = option(check=integer(ge=1))
    hidden_dim: int = option(check=integer(ge=1))
    num_experts: int = option(8, integer(ge=1))
    k: int = option(1, integer(ge=1))  # and <= num_experts
    capacity_factor: float = option(1.0, real(gt=0))
    eval_capacity_factor: float | None = option(None, real(gt=0, none=True))  # None: same as capacity_factor
    batch_priority: bool = option(True, flag())  # LIMoE trains with BPR
    noise_std: float = option(1.0, real(ge=0))  # router noise std is noise_std / num_experts (V-MoE), training only
    capacity_multiple_of: int = option(4, integer(ge=1))
    # Which tokens set the capacity C = ceil(n * k * cf / E): "all" S tokens of the group, padding included
    # (static shapes, no host sync), or only the "valid" ones. Padding never takes a slot either way, but with
    # "all" a text pass of short captions in 16 positions gets about twice the slots its real tokens need, so
    # text tokens can hardly be dropped. "valid" reads the count on the host (a sync on accelerators, shapes
    # that change with the data under torch.compile) and is refused with expert parallelism.
    capacity_tokens: str = option("all", one_of("all", "valid"))
    # Routing groups, as in V-MoE: the tokens of `group_size` consecutive examples (dim 0 of the input: images,
    # texts or, in joint training, image-text pairs) are routed together with their own capacity, BPR order and
    # aux losses (averaged over groups). None: everything one call holds is one group.
    group_size: int | None = option(None, integer(ge=1, none=True))
    # How a one-tower model groups a batch of pairs in training: "joint" = a pair's patches and text tokens share
    # one group and one capacity (LIMoE), "per_modality" = images and texts are grouped and routed apart.
    routing_groups: str = option("joint", one_of(*ROUTING_GROUPS))
    modalities: tuple[str, ...] = option(("image", "text"), sequence(text(), rule=_distinct_names))
    # Global-entropy threshold per modality: the loss asks each modality to use at least this many experts
    # (tau = log of it), a soft minimum that leaves a modality free to use fewer than all. None: half the experts
    # for every modality (chosen by experiment: docs/routing.md). num_experts makes the loss a plain -H.
    # Values in [1, num_experts], one per modality.
    global_entropy_min_experts: tuple[float, ...] | None = option(None, sequence(real(ge=1), none=True))
    # How the experts run (see limoe.moe.experts): "bmm" = batched matmuls on capacity-padded buffers,
    # "grouped_mm" = grouped GEMM on packed rows (CUDA sm90/sm100 in bf16, or CPU); "auto" = "bmm" for now.
    expert_backend: str = option("auto", one_of(*EXPERT_BACKENDS))
    # Expert weights at init: "shared" = one draw copied to every expert, as V-MoE (its experts' params are
    # initialised without splitting the RNG); routing then sends them different tokens and they grow apart.
    # "independent" = a draw per expert.
    expert_init: str = option("shared", one_of("shared", "independent"))

    def __post_init__(self) -> None:
        check_fields(self)  # each field's declared type and range; below, the checks across fields
        if self.k > self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got {self.k}")
        self.modalities = tuple(self.modalities)
        if self.global_entropy_min_experts is not None:
            self.global_entropy_min_experts = tuple(self.global_entropy_min_experts)
            if len(self.global_entropy_min_experts) != len(self.modalities):
                raise ValueError(f"global_entropy_min_experts needs one value per modality {self.modalities}, "
                                 f"got {self.global_entropy_min_experts}")
            if not all(s <= self.num_experts for s in self.global_entropy_min_experts):
                raise ValueError(f"global_entropy_min_experts values must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.global_entropy_min_experts}")

    @property
    def min_experts_per_modality(self) -> tuple[float, ...]:
        return self.global_entropy_min_experts or (max(1.0, self.num_experts / 2),) * len(self.modalities)


@dataclass
class MoeAux:
    """What one MoE call reports besides its output: unweighted aux losses and routing statistics."""

    losses: dict[str, torch.Tensor]  # scalar, differentiable; the caller weights and sums them
    stats: MoeStats
    routing: Routing


class MoeMlp(nn.Module):
    """Sparse Mixture-of-Experts MLP; each routing group of its input is routed on its own.

    forward(x [B, ..., d], modality=None | int | long [B, ...], valid=None | bool [B, ...]) -> (y, MoeAux).
    Dim 0 counts examples: `config.group_size` consecutive examples form one group (None: the whole input is
    one group). If B is not a multiple of the group size, the last group is filled up with padding examples, so
    every group has the same capacity. `modality` indexes `config.modalities` (None: every token is
    modalities[0]); `valid` False marks padding, which is neither routed nor counted and gets 0 from this layer.
    Capacity is computed from all tokens of a group, padding included, so it never depends on data (no host
    synchronisation), unless `capacity_tokens="valid"`.
    """

    def __init__(self, config: MoeConfig, experts: ExpertMlps | None = None):
        super().__init__()
        self.config = config
        self.router_dE = nn.Parameter(torch.empty(config.dim, config.num_experts))
        # `experts`: a prebuilt subset (an expert-parallel shard) so that the full set is never allocated.
        self.experts = experts if experts is not None else ExpertMlps(
            config.num_experts, config.dim, config.hidden_dim, shared_init=config.expert_init == "shared")
        self.reset_router()

    def reset_router(self) -> None:
        # V-MoE's router is a flax Dense without bias: lecun_normal, i.e. a normal truncated at 2 std whose
        # std is 1/sqrt(d) after truncation (hence the division by the truncated normal's std, 0.8796).
        std = self.config.dim ** -0.5 / 0.87962566103423978
        nn.init.trunc_normal_(self.router_dE, std=std, a=-2 * std, b=2 * std)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, hidden_dim={c.hidden_dim}, num_experts={c.num_experts}, k={c.k}, "
                f"capacity_factor={c.capacity_factor}/{c.eval_capacity_factor or c.capacity_factor} (train/eval), "
                f"batch_priority={c.batch_priority}, noise_std={c.noise_std}, group_size={c.group_size}")

    def capacity_for(self, num_tokens: int) -> int:
        cfg = self.config
        factor = cfg.capacity_factor if self.training else (cfg.eval_capacity_factor or cfg.capacity_factor)
        return capacity(num_tokens, cfg.num_experts, cfg.k, factor, cfg.capacity_multiple_of)

    def forward(self, x: torch.Tensor, modality: int | torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoeAux]:
        cfg = self.config
        if x.dim() < 1 or x.shape[-1] != cfg.dim:
            raise ValueError(f"x must have last dimension dim={cfg.dim}, got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        x_Sd = x.reshape(-1, cfg.dim)
        num_tokens = x_Sd.shape[0]
        modality_S = self._modality_ids(modality, lead_shape, x.device).reshape(-1)
        valid_S = self._valid_mask(valid, lead_shape).reshape(-1) if valid is not None else None
        num_groups = 1
        if cfg.group_size is not None:
            x_Sd, modality_S, valid_S, num_groups = self._fill_groups(x_Sd, modality_S, valid_S, lead_shape)

        logits_SE, noisy_logits_SE = self._router_logits(x_Sd)
        cap, capacity_G = self._group_capacity(x_Sd.shape[0] // num_groups, valid_S, num_groups)
        routing = route(torch.softmax(noisy_logits_SE, dim=-1), cfg.k, cap, cfg.batch_priority, valid_S,
                        num_groups, capacity_G)
        y_Sd = self._dispatch_combine(x_Sd, routing)

        # A comparison, not F.one_hot: one_hot validates its input with a host sync on accelerators.
        onehot_SM = (modality_S[:, None] == torch.arange(len(cfg.modalities), device=x.device)).float()
        if valid_S is not None:
            onehot_SM = onehot_SM * valid_S[:, None]
        logp_SE = torch.log_softmax(logits_SE, dim=-1)
        p_SE = logp_SE.exp()
        entropy_S = -(p_SE * logp_SE).sum(-1)
        aux_losses = self._aux_losses(logits_SE, noisy_logits_SE, p_SE, entropy_S, onehot_SM, num_groups)
        stats = MoeStats.compute(cfg.modalities, onehot_SM, routing.expert_SK, routing.kept_SK, entropy_S,
                                 cfg.num_experts)
        if x_Sd.shape[0] != num_tokens:  # drop the padding examples that filled the last group
            y_Sd, routing = y_Sd[:num_tokens], routing.token_slice(num_tokens)
        return y_Sd.reshape(x.shape), MoeAux(aux_losses, stats, routing)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _fill_groups(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None,
                     lead_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Append padding examples until dim 0 is a multiple of the group size; returns the number of groups."""
        group = self.config.group_size
        examples = lead_shape[0] if lead_shape else 1
        missing = -examples % group
        if missing == 0:
            return x_Sd, modality_S, valid_S, examples // group
        num_tokens = x_Sd.shape[0]
        pad = missing * (num_tokens // examples if examples else 1)
        x_Sd = torch.cat([x_Sd, x_Sd.new_zeros(pad, x_Sd.shape[1])])
        modality_S = torch.cat([modality_S, modality_S.new_zeros(pad)])
        real_S = valid_S if valid_S is not None else torch.ones(num_tokens, dtype=torch.bool, device=x_Sd.device)
        valid_S = torch.cat([real_S, real_S.new_zeros(pad)])
        return x_Sd, modality_S, valid_S, (examples + missing) // group

    def _group_capacity(self, group_tokens: int, valid_S: torch.Tensor | None, num_groups: int
                        ) -> tuple[int, torch.Tensor | None]:
        """Slots per expert and group (buffer size), and per-group limits when they differ by group."""
        if self.config.capacity_tokens == "valid" and valid_S is not None:
            # Host sync: the buffers' shape follows the data.
            caps = [self.capacity_for(max(1, n)) for n in valid_S.view(num_groups, -1).sum(1).tolist()]
            if len(set(caps)) > 1:
                return max(caps), torch.tensor(caps, device=valid_S.device)
            return caps[0], None
        return self.capacity_for(group_tokens), None

    def _router_logits(self, x_Sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits even under autocast: routing decisions are sensitive to rounding."""
        device_type = x_Sd.device.type
        no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                       else contextlib.nullcontext())  # e.g. the meta device, where models are sized
        with no_autocast:
            logits_SE = x_Sd.float() @ self.router_dE.float()
        if self.training and self.config.noise_std > 0:
            noise_std = self.config.noise_std / self.config.num_experts
            return logits_SE, logits_SE + noise_std * torch.randn_like(logits_SE)
        return logits_SE, logits_SE

    def _dispatch_combine(self, x_Sd: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Gather kept tokens into expert buffers, run the experts, gather back and weight by gate.

        Buffers are capacity-padded [E, G*C, d] (bmm backend: each expert's C slots of every group) or packed
        [R, d] groups (grouped_mm backend, see `_packed_rows`). Empty buffer rows and dropped assignments point at
        row 0 instead of a zero row: nothing reads an empty row's output (so its gradient is exactly 0) and a
        dropped choice has weight 0. This saves padding copies of the activations in both directions.
        """
        num_tokens, dim = x_Sd.shape
        num_experts, slots = routing.num_experts, routing.num_groups * routing.capacity
        if self._uses_grouped_mm(x_Sd):
            kept_row_SK, group_end_E, num_rows = self._packed_rows(routing)
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
            y_Rd = self.experts.forward_grouped(x_Rd, group_end_E)
        else:
            y_Rd = self.run_experts(x_Rd.view(num_experts, slots, dim)).view(num_rows, dim)

        row_SK = torch.where(routing.kept_SK, kept_row_SK, 0)
        weight_SK = (routing.gate_SK * routing.kept_SK).to(y_Rd.dtype)
        if routing.k == 1:  # skip the [S, K, d] intermediate in the common case
            return y_Rd.index_select(0, row_SK[:, 0]) * weight_SK
        y_SKd = y_Rd.index_select(0, row_SK.reshape(-1)).view(num_tokens, routing.k, dim)
        return torch.einsum("skd,sk->sd", y_SKd, weight_SK)

    def _uses_grouped_mm(self, x_Sd: torch.Tensor) -> bool:
        cfg = self.config
        return resolve_expert_backend(cfg.expert_backend, x_Sd.device, compute_dtype(x_Sd), cfg.dim,
                                      cfg.hidden_dim) == "grouped_mm"

    @staticmethod
    def _packed_rows(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, int]:
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

    def run_experts(self, x_ECd: torch.Tensor) -> torch.Tensor:
        """All E experts on their capacity buffers (C = every group's slots). The hook expert parallelism
        overrides."""
        return self.experts(x_ECd)

    def _aux_losses(self, logits_SE: torch.Tensor, noisy_logits_SE: torch.Tensor, p_SE: torch.Tensor,
                    entropy_S: torch.Tensor, onehot_SM: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
        """Each loss on each routing group, averaged over the groups that have tokens (of that modality)."""
        cfg = self.config
        logits_GSE, noisy_GSE, p_GSE, entropy_GS, w_GSM = (
            t.view(num_groups, -1, *t.shape[1:]) for t in (logits_SE, noisy_logits_SE, p_SE, entropy_S, onehot_SM))
        w_GS = w_GSM.sum(-1)
        count_G, count_GM = w_GS.sum(-1), w_GSM.sum(-2)
        out = {"importance": losses.mean_over_groups(losses.importance_loss(p_GSE, w_GS), count_G)}
        if self.training and cfg.noise_std > 0:
            load_G = losses.load_loss(logits_GSE, noisy_GSE, cfg.noise_std / cfg.num_experts, cfg.k, w_GS)
            out["load"] = losses.mean_over_groups(load_G, count_G)
        else:
            out["load"] = logits_SE.new_zeros(())
        out["z"] = losses.mean_over_groups(losses.z_loss(logits_GSE, w_GS), count_G)
        local_M = losses.mean_over_groups(losses.local_entropy_loss(entropy_GS, w_GSM), count_GM)
        # Built on the device, not copied from a host list: a blocking copy would sync the host every call.
        min_experts_M = torch.stack([p_SE.new_full((), float(v)) for v in cfg.min_experts_per_modality])
        global_M = losses.mean_over_groups(losses.global_entropy_loss(p_GSE, w_GSM, min_experts_M), count_GM)
        for m, name in enumerate(cfg.modalities):
            out[f"local_entropy/{name}"] = local_M[m]
            out[f"global_entropy/{name}"] = global_M[m]
        return out

    def _modality_ids(self, modality: int | torch.Tensor | None, lead_shape: torch.Size,
                      device: torch.device) -> torch.Tensor:
        num_modalities = len(self.config.modalities)
        if modality is None:
            modality = 0
        if isinstance(modality, int):
            if not 0 <= modality < num_modalities:
                raise ValueError(f"modality must be in [0, {num_modalities}) for {self.config.modalities}, "
                                 f"got {modality}")
            return torch.full(lead_shape, modality, dtype=torch.long, device=device)
        if modality.shape != lead_shape or modality.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"modality must be an integer tensor of shape {tuple(lead_shape)}, got "
                             f"{modality.dtype} {tuple(modality.shape)}")
        # A data-dependent check: on accelerators it would stall the stream, and compiled graphs cannot hold it.
        if modality.device.type == "cpu" and not torch.compiler.is_compiling():
            if modality.numel() and not (0 <= int(modality.min()) and int(modality.max()) < num_modalities):
                raise ValueError(f"modality ids must be in [0, {num_modalities}) for {self.config.modalities}")
        return modality.long().to(device)

    @staticmethod
    def _valid_mask(valid: torch.Tensor, lead_shape: torch.Size) -> torch.Tensor:
        if valid.shape != lead_shape or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {tuple(lead_shape)}, got "
                             f"{valid.dtype} {tuple(valid.shape)}")
        return valid
