"""MoE layer (each router) vs dense MLP vs one-hot einsum dispatch: forward+backward time, side by side in one run.

    python benchmarks/moe_layer.py                      # CPU defaults: d=256, h=1024, 8k tokens, E=8 and 32, fp32
    python benchmarks/moe_layer.py --device cuda --dim 768 --hidden 3072 --tokens 65536 --json rows.json
    python benchmarks/moe_layer.py --device cuda ... --compile --bpr 1     # torch.compile every variant
    python benchmarks/moe_layer.py --routers top_k soft --group-tokens 256  # routing groups of 256 tokens

Each MoE variant (k=1, capacity factor 1.0, BPR off/on, each expert backend) is timed against a dense MLP of the
same active width on the same input, and against GShard/V-MoE-style dispatch with dense one-hot [S, E, C] tensors
(one routing group only; skipped when that tensor would be too large). Every router runs: top_k with BPR off and
on, and once per expert count expert_choice and soft (Soft MoE, slots per expert = the top-1 capacity of a group,
so as many expert rows as top_k; its slots use the padded buffers whatever the backend). Soft MoE's dispatch and
combine cost grows with the group's size: all tokens are one group unless --group-tokens. Ratios are dense time
/ variant time, so 1.0 means dense speed, higher is faster. The dtype defaults to bf16 autocast on CUDA and fp32
on CPU; the expert backends default to bmm and, where its fused kernel runs (CUDA sm90/sm100, bf16), grouped_mm.

TFLOP/s counts active FLOPs only, the same for every variant: forward 2 matmuls of 2*S*d*h*k FLOPs each, backward
twice that (input and weight gradients), so 12*S*d*h*k per step. Router, dispatch and empty capacity slots are
not counted: they are the MoE layer's overhead, which the ratio to dense shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import autocast_dtype, profile_top, time_interleaved  # noqa: E402

from limoe.model import Mlp  # noqa: E402
from limoe.moe import MoeConfig, MoeMlp, capacity, route  # noqa: E402
from limoe.moe.experts import grouped_mm_is_fast  # noqa: E402
from limoe.moe.reference import moe_onehot_einsum  # noqa: E402

ONEHOT_MAX_ELEMENTS = 2**28  # [S, E, C] one-hot tensors above this are not built


def _maybe_compile(fn, enabled: bool):
    return torch.compile(fn) if enabled else fn


def make_steps(args, device, dtype, num_experts, batch_priority, backends):
    """Closures that run forward+backward for dense, each router and MoE backend and one-hot einsum on the same
    input."""
    if args.compile:
        torch._dynamo.reset()  # fresh caches per configuration: no recompile limits, no stale graphs
    torch.manual_seed(0)
    x_Sd = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    dense = _maybe_compile(Mlp(args.dim, args.hidden).to(device), args.compile)
    steps = {}

    def dense_step():
        with autocast:
            y = dense(x_Sd)
        y.float().sum().backward()

    steps["dense MLP"] = dense_step
    group = args.group_tokens or args.tokens
    x_in = x_Sd.view(args.tokens // group, group, args.dim)  # one routing group per row of x_in
    top_k = None
    for router, backend in _router_backends(args, backends, batch_priority):
        torch.manual_seed(0)  # the same weights for every backend
        # What each router reads (ROUTER_OPTIONS): k and BPR are top_k's; Soft MoE's slots match top-1's capacity.
        own = ({"k": args.k, "batch_priority": batch_priority} if router == "top_k" else
               {"slots_per_expert": capacity(group, num_experts, 1, args.capacity_factor)} if router == "soft" else {})
        moe = MoeMlp(MoeConfig(args.dim, args.hidden, num_experts=num_experts, capacity_factor=args.capacity_factor,
                               expert_backend=backend, router=router, group_size=1, **own)).to(device).train()
        top_k = moe if router == "top_k" else top_k

        def moe_forward(x, moe=moe):  # tensors only: what a compiled graph returns
            y, aux = moe(x)
            return y, sum(aux.losses.values())

        moe_forward = _maybe_compile(moe_forward, args.compile)

        def moe_step(moe_forward=moe_forward):
            with autocast:
                y, aux_loss = moe_forward(x_in)
            (y.float().sum() + aux_loss).backward()

        name = (f"MoE E={num_experts} bpr={int(batch_priority)} {backend}" if router == "top_k" else
                f"MoE E={num_experts} soft" if router == "soft" else f"MoE E={num_experts} {router} {backend}")
        steps[name] = moe_step

    if top_k is None:
        return steps
    moe = top_k
    onehot_elements = args.tokens * num_experts * moe.capacity_for(group)
    # The one-hot reference knows one routing group only.
    if not args.no_onehot and not args.compile and group == args.tokens and onehot_elements <= ONEHOT_MAX_ELEMENTS:
        def onehot_step():
            with autocast:
                logits_SE, noisy_SE = moe.router.logits(x_Sd)
                routing = route(torch.softmax(noisy_SE, -1), args.k, moe.capacity_for(group), batch_priority)
                y = moe_onehot_einsum(moe.experts, x_Sd.to(dtype), routing)
            y.float().sum().backward()

        steps[f"one-hot einsum E={num_experts}"] = onehot_step
    return steps


def _router_backends(args, backends: list[str], batch_priority: bool) -> list[tuple[str, str]]:
    """(router, backend) pairs of one configuration: top_k on each backend with this BPR setting; the other
    routers (no BPR) with the first BPR setting only, soft once (its slots always use the padded buffers)."""
    pairs = [("top_k", b) for b in backends] if "top_k" in args.routers else []
    if batch_priority == bool(args.bpr[0]):
        pairs += [("expert_choice", b) for b in backends if "expert_choice" in args.routers]
        pairs += [("soft", backends[0])] if "soft" in args.routers else []
    return pairs


def default_backends(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> list[str]:
    return ["bmm", "grouped_mm"] if grouped_mm_is_fast(device, dtype, dim, hidden) else ["bmm"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--routers", nargs="+", choices=["top_k", "expert_choice", "soft"],
                        default=["top_k", "expert_choice", "soft"], help="routers to time (default: all)")
    parser.add_argument("--group-tokens", type=int, help="tokens per routing group (default: all tokens, one group)")
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--bpr", type=int, nargs="+", choices=[0, 1], default=[0, 1], help="batch priority routing")
    parser.add_argument("--backends", nargs="+", choices=["bmm", "grouped_mm"],
                        help="expert backends (default: bmm, plus grouped_mm where its fused kernel runs)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    parser.add_argument("--compile", action="store_true", help="torch.compile dense and MoE (one-hot is skipped)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-onehot", action="store_true", help="skip the one-hot einsum baseline")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing each configuration, profile N more steps per variant (top kernels)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for flag in ("tokens", "dim", "hidden", "reps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.group_tokens is not None and (args.group_tokens < 1 or args.tokens % args.group_tokens):
        raise ValueError(f"--group-tokens must divide --tokens={args.tokens}, got {args.group_tokens}")
    for flag in ("warmup", "profile"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    dtype_name, dtype = autocast_dtype(args.dtype, device)
    backends = args.backends or default_backends(device, dtype, args.dim, args.hidden)
    # Forward+backward of a d->h->d MLP: 2 matmuls x 2 flops x 3 (forward, grad input, grad weight).
    flops = 12 * args.tokens * args.dim * args.hidden * args.k

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({name}) threads={torch.get_num_threads()} torch={torch.__version__} dtype={dtype_name} "
          f"compile={args.compile} d={args.dim} h={args.hidden} tokens={args.tokens} k={args.k} "
          f"cf={args.capacity_factor} group={args.group_tokens or args.tokens}")
    header = f"{'variant':<34}{'ms':>9}{'tokens/s':>12}{'TFLOP/s':>9}{'peak MiB':>10}{'x dense':>9}"
    print(header)
    rows = []
    for num_experts in args.experts:
        for bpr in map(bool, args.bpr):
            steps = make_steps(args, device, dtype, num_experts, bpr, backends)
            measured = time_interleaved(steps, device, args.reps, args.warmup)
            dense_ms = measured["dense MLP"][0]
            for variant, (ms, peak) in measured.items():
                row = dict(variant=variant, experts=num_experts, bpr=bpr, dtype=dtype_name, compile=args.compile,
                           tokens=args.tokens, dim=args.dim, hidden=args.hidden, ms=ms,
                           tokens_per_s=args.tokens / ms * 1e3, tflops=flops / ms / 1e9, peak_mib=peak,
                           ratio_to_dense=dense_ms / ms)
                rows.append(row)
                print(f"{variant:<34}{ms:>9.2f}{row['tokens_per_s']:>12.0f}{row['tflops']:>9.2f}{peak:>10.0f}"
                      f"{row['ratio_to_dense']:>9.2f}", flush=True)
            if args.profile:
                profile_top(steps, device, args.profile)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
