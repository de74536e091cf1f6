"""MoeConfig: every option of a sparse MoE MLP layer, each declaring its check."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields

from limoe.checks import ConfigError, check_fields, flag, integer, one_of, option, real, sequence, text
from limoe.moe.experts import EXPERT_BACKENDS
from limoe.moe.routers import ROUTERS
from limoe.moe.routing import CAPACITY_ROUNDINGS

ROUTING_GROUPS = ("joint", "per_modality")
SOFT_INITS = ("vmoe", "unit_columns")
# Routers for which k has no meaning, and why.
_WHY_K_IS_1 = {"expert_choice": "each expert picks its tokens; moe.capacity_factor sets how many",
               "soft": "every token is mixed into every slot; moe.slots_per_expert sets how many"}


# What `moe.router=<name>` brings along when a preset's model is built with it (`limoe.model.registry`): the
# settings its paper trains with, for every key the same overrides leave unset. Soft MoE (V-MoE's soft_moe
# project) routes each example's tokens of each modality as a group, its slots rounded to nearest; a preset's joint
# groups of 8 pairs would let a caption's slots mix in its own image. Expert Choice needs nothing here: noise_std
# applies to it as to top_k. Neither trains with aux losses by default (`limoe.losses.LossConfig`).
ROUTER_PAPER_DEFAULTS = {
    "soft": {"group_size": 1, "routing_groups": "per_modality", "capacity_rounding": "round",
             "capacity_multiple_of": 1},
}


# The routing options each router reads. The fields stay flat, as V-MoE's router arguments and torchtitan's MoEArgs
# are, because top_k and expert_choice share most of them; options not named here (experts, routing groups,
# modalities, entropy thresholds, backend, init) apply to every router. A value other than its default in an option
# the chosen router does not read would do nothing: MoeConfig refuses it.
_CAPACITY = ("capacity_factor", "eval_capacity_factor", "capacity_rounding", "capacity_multiple_of",
             "capacity_tokens")
ROUTER_OPTIONS = {
    "top_k": ("k", "batch_priority", "noise_std", *_CAPACITY),
    "expert_choice": ("noise_std", *_CAPACITY),
    # The three capacity options set the slots a model derives when slots_per_expert is unset (ModelConfig).
    "soft": ("slots_per_expert", "soft_init", "capacity_factor", "capacity_rounding", "capacity_multiple_of"),
}
_ROUTING_OPTIONS = tuple(dict.fromkeys(key for keys in ROUTER_OPTIONS.values() for key in keys))


def unread_options(router: str) -> tuple[str, ...]:
    """The routing options `router` does not read (ROUTER_OPTIONS); none for a router MoeConfig will refuse."""
    read = ROUTER_OPTIONS.get(router) if isinstance(router, str) else None
    return () if read is None else tuple(key for key in _ROUTING_OPTIONS if key not in read)


def without_unread_options(moe: dict, keep: Iterable[str] = ()) -> dict:
    """MoeConfig keyword arguments `moe` without the options its router does not read (but those in `keep`): what
    a preset's values become when a different router is chosen, and a saved model.json whose router ignored them."""
    unread = set(unread_options(moe.get("router", "top_k"))) - set(keep)
    return {key: value for key, value in moe.items() if key not in unread}


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
    # Router noise, training only: std noise_std / num_experts on the logits (V-MoE), for top_k and expert_choice
    noise_std: float = option(1.0, real(ge=0))
    # Capacity C = n * k * cf / E rounded up ("ceil") or to nearest ("round"), then up to a multiple of
    # capacity_multiple_of: V-MoE's compute_capacity (its routers: ceil, 4; its Soft MoE slots: round, 1).
    capacity_rounding: str = option("ceil", one_of(*CAPACITY_ROUNDINGS))
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
    # Which router assigns tokens to experts (limoe.moe.routers): "top_k" = V-MoE's top-k per token with capacity
    # and BPR. The options above that shape routing (k, capacity, batch_priority, noise_std) are top_k's; the
    # routing groups apply to every router.
    # "expert_choice" = each expert picks its top-C tokens of a group (Zhou et al. 2022): it needs C <= the
    # group's tokens and has no per-token order (no batch_priority). "soft" = Soft MoE (Puigcerver et al. 2023):
    # every slot mixes all tokens of a group, every token all slots; needs slots_per_expert. ROUTER_OPTIONS says
    # which options each reads.
    router: str = option("top_k", one_of(*ROUTERS))
    # Soft MoE's slots per expert p (its router has a learned column per slot, so p is fixed). A model built from a
    # ModelConfig sets it, if left None, to the top-1 capacity of its training routing group (matched compute).
    slots_per_expert: int | None = option(None, integer(ge=1, none=True))
    # Soft MoE's slot parameters phi [d, E p] at init: "vmoe" = V-MoE's lecun_normal over (d, E, p), std
    # 1/sqrt(d E); "unit_columns" = std 1/sqrt(d), each slot's column about unit norm. Only directions matter
    # (phi is normalised), but under Adam a smaller phi turns sqrt(E) times faster.
    soft_init: str = option("vmoe", one_of(*SOFT_INITS))

    def __post_init__(self) -> None:
        check_fields(self)  # each field's declared type and range; below, the checks across fields
        if self.k > self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.router in _WHY_K_IS_1 and self.k != 1:
            raise ConfigError(f"moe.k={self.k} has no meaning with moe.router={self.router!r} "
                              f"({_WHY_K_IS_1[self.router]}): leave k at 1")
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        for key in unread_options(self.router):
            if getattr(self, key) != defaults[key]:
                raise ConfigError(f"moe.{key}={getattr(self, key)!r} does nothing with moe.router={self.router!r}, "
                                  f"which reads {', '.join(ROUTER_OPTIONS[self.router])}: leave it unset")
        if self.router == "expert_choice":
            for key in ("capacity_factor", "eval_capacity_factor"):
                factor = getattr(self, key)
                if factor is not None and factor > self.num_experts:
                    raise ConfigError(f"moe.{key}={factor} with moe.router='expert_choice' asks each of the "
                                      f"{self.num_experts} experts for more tokens than a group has: at most "
                                      f"moe.num_experts={self.num_experts}")
        if self.router == "soft" and self.slots_per_expert is None:
            raise ConfigError("moe.router='soft' needs moe.slots_per_expert (a model derives it from moe.group_size "
                              "when that is set)")
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
