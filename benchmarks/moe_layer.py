"""MoE layer vs dense MLP vs one-hot einsum dispatch: forward+backward time, measured side by side in one run.

    python benchmarks/moe_layer.py                      # CPU defaults: d=256, h=1024, 8k tokens, E=8 and 32
    python benchmarks/moe_layer.py --device cuda --dim 768 --hidden 3072 --tokens 65536 --dtype bf16

Each MoE variant (k=1, capacity factor 1.0, BPR off/on) is timed against a dense MLP of the same active width on
the same input, and against GShard/V-MoE-style dispatch with dense one-hot [S, E, C] tensors (skipped when that
tensor would be too large). Ratios are dense time / variant time, so 1.0 means dense speed, higher is faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from limoe.model import Mlp  # noqa: E402
from limoe.moe import MoeConfig, MoeMlp, route  # noqa: E402
from limoe.moe.reference import moe_onehot_einsum  # noqa: E402

ONEHOT_MAX_ELEMENTS = 2**28  # [S, E, C] one-hot tensors above this are not built


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def time_interleaved(steps: dict, device: torch.device, reps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median milliseconds of one forward+backward and peak memory (MiB) per step function.

    Repetitions go round-robin over the variants, so background load slows all of them alike and the ratios
    stay fair on a busy machine.
    """
    peaks = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        _sync(device)
        _reset_peak(device)
        step()
        _sync(device)
        peaks[name] = _peak_mib(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


def make_steps(args, device, dtype, num_experts, batch_priority):
    """Closures that run forward+backward for dense, MoE and one-hot einsum on the same input."""
    torch.manual_seed(0)
    x_Sd = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    dense = Mlp(args.dim, args.hidden).to(device)
    moe = MoeMlp(MoeConfig(args.dim, args.hidden, num_experts=num_experts, k=args.k,
                           capacity_factor=args.capacity_factor, batch_priority=batch_priority)).to(device).train()

    def dense_step():
        with autocast:
            y = dense(x_Sd)
        y.float().sum().backward()

    def moe_step():
        with autocast:
            y, aux = moe(x_Sd)
        (y.float().sum() + sum(aux.losses.values())).backward()

    def onehot_step():
        with autocast:
            logits_SE, noisy_SE = moe._router_logits(x_Sd)
            routing = route(torch.softmax(noisy_SE, -1), args.k, moe.capacity_for(args.tokens), batch_priority)
            y = moe_onehot_einsum(moe.experts, x_Sd.to(dtype), routing)
        y.float().sum().backward()

    onehot_elements = args.tokens * num_experts * moe.capacity_for(args.tokens)
    return dense_step, moe_step, (onehot_step if onehot_elements <= ONEHOT_MAX_ELEMENTS else None)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-onehot", action="store_true", help="skip the one-hot einsum baseline")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    # Forward+backward of a d->h->d MLP: 2 matmuls x 2 flops x 3 (forward, grad input, grad weight).
    flops = 12 * args.tokens * args.dim * args.hidden * args.k

    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} dtype={args.dtype} "
          f"d={args.dim} h={args.hidden} tokens={args.tokens} k={args.k} cf={args.capacity_factor}")
    header = f"{'variant':<28}{'ms':>9}{'tokens/s':>12}{'TFLOP/s':>9}{'peak MiB':>10}{'x dense':>9}"
    print(header)
    rows = []
    for num_experts in args.experts:
        for bpr in (False, True):
            dense_step, moe_step, onehot_step = make_steps(args, device, dtype, num_experts, bpr)
            variants = {"dense MLP": dense_step, f"MoE E={num_experts} bpr={int(bpr)}": moe_step}
            if onehot_step is not None and not args.no_onehot:
                variants[f"one-hot einsum E={num_experts}"] = onehot_step
            measured = time_interleaved(variants, device, args.reps, args.warmup)
            dense_ms = measured["dense MLP"][0]
            for name, (ms, peak) in measured.items():
                row = dict(variant=name, experts=num_experts, bpr=bpr, ms=ms, tokens_per_s=args.tokens / ms * 1e3,
                           tflops=flops / ms / 1e9, peak_mib=peak, ratio_to_dense=dense_ms / ms)
                rows.append(row)
                print(f"{name:<28}{ms:>9.2f}{row['tokens_per_s']:>12.0f}{row['tflops']:>9.2f}{peak:>10.0f}"
                      f"{row['ratio_to_dense']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
