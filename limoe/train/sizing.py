"""Memory per rank of a model under a distributed layout: weights, gradients, AdamW states and activations,
sized from the model built on the meta device (shapes only: no memory, no compute), before renting the GPUs.

    estimate("limoe-h14", Layout(ranks=64, expert_parallel=8, fsdp=True), batch_per_rank=16)

Training keeps 16 bytes per parameter a rank holds (fp32 weight and gradient, AdamW's two fp32 moments).
Activations are the tensors the forward saves for the backward, counted by a meta-device forward of
`batch_per_rank` pairs (float32; bf16 autocast roughly halves them, which the estimate assumes). With activation
checkpointing only each block's input is kept, plus one block's activations while it is recomputed. Not counted:
the CUDA context and allocator slack (a few GiB), the loss's B x B logits, and communication buffers (FSDP's
all-gathered unit, EP's [E, C, d] exchange buffers).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from limoe.model.config import ModelConfig
from limoe.model.flops import mlp_params, model_info
from limoe.moe.layer import MoeMlp
from limoe.parallel.mesh import check_expert_parallel

GIB = 2**30
BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments


@dataclass(frozen=True)
class Layout:
    ranks: int = 1
    expert_parallel: int = 1
    fsdp: bool = False

    def __str__(self) -> str:
        parts = [f"{self.ranks} rank{'s' if self.ranks > 1 else ''}"]
        if self.expert_parallel > 1:
            parts.append(f"EP {self.expert_parallel}")
        parts.append("FSDP" if self.fsdp else ("DDP" if self.ranks > 1 else "one process"))
        return ", ".join(parts)

    def params_per_rank(self, expert: int, other: int) -> int:
        """Parameters one rank holds: experts split over EP, then (FSDP) over the ranks holding the same experts;
        the rest split over all ranks by FSDP, else replicated. The largest share where shards are uneven."""
        expert_share = math.ceil(expert / self.expert_parallel)
        if not self.fsdp:
            return expert_share + other
        return math.ceil(expert_share / (self.ranks // self.expert_parallel)) + math.ceil(other / self.ranks)


@dataclass(frozen=True)
class Estimate:
    model: str
    layout: Layout
    batch_per_rank: int
    params: int  # parameters held by one rank
    activation_bytes: int
    expert_params: int  # of the whole model
    recompute: bool = False  # activation checkpointing

    @property
    def states_gib(self) -> float:
        """Weights, gradients and AdamW moments of this rank's parameters."""
        return self.params * BYTES_PER_PARAM / GIB

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.activation_bytes / GIB


def parameter_split(model: torch.nn.Module) -> tuple[int, int]:
    """(expert parameters, all other parameters) of a model, e.g. one built on the meta device."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, MoeMlp) for p in m.experts.parameters()}
    expert = sum(p.numel() for p in model.parameters() if id(p) in expert_ids)
    return expert, sum(p.numel() for p in model.parameters()) - expert


def meta_model(config: ModelConfig) -> torch.nn.Module:
    from limoe.model.registry import build_model

    with torch.device("meta"):
        return build_model(config)


def activation_bytes(model: torch.nn.Module, batch: int, checkpointing: bool = False, bf16: bool = False) -> int:
    """Bytes the training forward of `batch` pairs saves for the backward (a meta-device model: no compute)."""
    cfg = model.config

    weights = {id(p) for p in model.parameters()}

    def saved_by_forward() -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if id(t) not in weights and id(t._base) not in weights:  # a saved weight (or its view) costs nothing
                total += t.numel() * t.element_size()
            return t

        images = torch.empty(batch, 3, cfg.image_size, cfg.image_size, device="meta")
        tokens = torch.ones(batch, cfg.context_length, dtype=torch.long, device="meta")
        valid = torch.ones(batch, cfg.context_length, dtype=torch.bool, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(images, tokens, valid_BT=valid)
        return total

    model.set_activation_checkpointing(False)
    everything = saved_by_forward()
    if checkpointing:
        model.set_activation_checkpointing(True)
        outside_blocks = saved_by_forward()  # the embeddings, heads and pooling keep theirs
        model.set_activation_checkpointing(False)
        blocks = sum(1 for m in model.modules() if type(m).__name__ == "Block")
        tokens = cfg.num_patches + cfg.context_length
        inputs = blocks * batch * tokens * cfg.width * 4
        everything = outside_blocks + inputs + (everything - outside_blocks) // blocks
    return everything // 2 if bf16 else everything


def estimate(model: str | ModelConfig, layout: Layout, batch_per_rank: int, checkpointing: bool = False,
             bf16: bool = False) -> Estimate:
    from limoe.model.registry import get_config

    config = get_config(model) if isinstance(model, str) else model
    built = meta_model(config)
    expert, other = parameter_split(built)
    name = model if isinstance(model, str) else "model"
    experts = config.moe_config().num_experts if config.moe_layer_ids else None
    if experts is None and layout.expert_parallel > 1:
        raise ValueError(f"expert parallelism needs a model with MoE layers ({name} has none)")
    check_expert_parallel(layout.expert_parallel, layout.ranks, experts)
    return Estimate(name, layout, batch_per_rank, layout.params_per_rank(expert, other),
                    activation_bytes(built, batch_per_rank, checkpointing, bf16), expert, checkpointing)


def physical_memory(device: torch.device) -> int | None:
    """Bytes of memory a training process on `device` can have at most: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): not checked
        return None


def check_fits(config: ModelConfig, layout: Layout, micro_batch: int, device: torch.device,
               checkpointing: bool = False) -> None:
    """Refuse, in a second and before anything is built, a model that cannot fit: 16 bytes per parameter of this
    rank's share, plus a lower bound of a step's activations (each block keeps at least its input and, without
    checkpointing, its MLP's hidden layer). Analytic, so even absurd sizes (depth 100,000, a billion-token
    vocabulary) are refused at once instead of hanging in the build or aborting in an allocator."""
    memory = physical_memory(device)
    if memory is None:
        return
    info = model_info(config)
    towers = 2 if config.kind == "two_tower" else 1
    experts = config.moe_config().num_experts if config.moe_layer_ids else 0
    expert = towers * len(config.moe_layer_ids) * experts * mlp_params(config.width, config.mlp_dim)
    params = layout.params_per_rank(expert, info.total_params - expert)
    states = params * BYTES_PER_PARAM
    tokens = config.num_patches + config.context_length  # per pair, one pass of each through the blocks
    per_token = config.width * (1 if checkpointing else 2) + (0 if checkpointing else config.mlp_dim)
    activations = micro_batch * tokens * config.depth * per_token * (2 if device.type == "cuda" else 4)
    if states + activations > memory:
        where = "GPU" if device.type == "cuda" else "this machine's RAM"
        raise ValueError(f"the model cannot fit: {count(params)} parameters need {size(states)} for weights, "
                         f"gradients and AdamW, and a micro-batch of {micro_batch} pairs at least "
                         f"{size(activations)} of activations, against {size(memory)} of {where} (width "
                         f"{config.width}, depth {config.depth}, {config.num_patches} patches, context "
                         f"{config.context_length}, vocabulary {config.vocab_size}; `limoe memory` sizes presets)")


def count(n: float) -> str:
    """A parameter count with the unit that keeps it readable: 590 K, 125.8 M, 5.59 B."""
    for unit, size, digits in (("B", 1e9, 2), ("M", 1e6, 1), ("K", 1e3, 0)):
        if n >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n:.0f}"


def size(nbytes: float) -> str:
    """Bytes in the binary unit that keeps them readable (a tiny model's states are KiB, an H/14's GiB)."""
    for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale * 1000 / 1024:  # 1.0 GiB rather than 1003.1 MiB
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def table(estimates: list[Estimate], budget_gib: float | None = None) -> str:
    """A markdown table of estimates, one row each."""
    head = "| model | layout | batch / rank | params / rank | weights+grads+AdamW | activations | training |"
    rows = [head, "|---|---|---:|---:|---:|---:|---:|"]

    def fits(gib: float) -> str:
        return "" if budget_gib is None else (" (fits)" if gib <= budget_gib else " (too big)")

    for e in estimates:
        layout = f"{e.layout}, recompute" if e.recompute else str(e.layout)
        rows.append(f"| {e.model} | {layout} | {e.batch_per_rank} | {count(e.params)} | {size(e.states_gib * GIB)} | "
                    f"{size(e.activation_bytes)} | {size(e.total_gib * GIB)}{fits(e.total_gib)} |")
    return "\n".join(rows)


# -- limoe memory ---------------------------------------------------------------------------------------------
def add_memory_parser(sub) -> None:
    p = sub.add_parser("memory", help="memory per rank of a model under a distributed layout (sized on the meta "
                                      "device: no GPU, seconds)")
    p.add_argument("--model", default="limoe-h14", help="a preset name (default: limoe-h14)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8], help="world sizes, one row each (default: 8)")
    p.add_argument("--expert-parallel", type=int, default=1, help="EP size P (default: 1)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (dist.fsdp=true)")
    p.add_argument("--batch-per-rank", type=int, default=16, help="pairs per rank and micro-batch (default: 16)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward, keeping only its input (activation_checkpointing=true)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="activations' (default: bf16)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU to compare with (default: 80)")
    p.set_defaults(func=_memory)


def _memory(args) -> int:
    from limoe.errors import UserError
    from limoe.model.registry import list_models

    if args.model not in list_models():
        raise UserError(f"unknown model {args.model!r}; known: {', '.join(list_models())}")
    rows = []
    for ranks in args.ranks:
        try:
            rows.append(estimate(args.model, Layout(ranks, args.expert_parallel, args.fsdp), args.batch_per_rank,
                                 args.activation_checkpointing, args.precision == "bf16"))
        except ValueError as e:
            raise UserError(str(e)) from None
    print(table(rows, args.gpu_gib))
    return 0
