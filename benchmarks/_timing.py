"""Timing helpers shared by the benchmark scripts: synchronised wall-clock medians and peak memory."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def autocast_dtype(name: str, device: torch.device) -> tuple[str, torch.dtype]:
    """(name, dtype) of a --dtype choice; "auto" is bf16 autocast on CUDA and fp32 (no autocast) elsewhere."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return name, {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def time_interleaved(steps: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int
                     ) -> dict[str, tuple[float, float]]:
    """Median milliseconds of one call and peak memory (MiB) per step function.

    Repetitions go round-robin over the variants, so background load slows all of them alike and the ratios
    stay fair on a busy machine.
    """
    peaks = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        sync(device)
        reset_peak(device)
        step()
        sync(device)
        peaks[name] = peak_mib(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


# Kernel names of matrix products: cuBLAS (xmma, nvjet, gemm), CUTLASS (grouped_mm), inductor's mm templates.
MATMUL_KERNEL = re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|triton_tem|addmm|bmm|\bmm\b", re.IGNORECASE)


def profile_top(steps: dict[str, Callable[[], object]], device: torch.device, num_steps: int, top: int = 15
                ) -> dict[str, dict]:
    """Run each step `num_steps` times under torch.profiler; print and return its most expensive kernels.

    On CUDA the ranking is by kernel (device) time, on CPU by self CPU time of operators. `matmul_share` is the
    fraction of that time in matrix-product kernels (by name), the rest being memory-bound work and overhead.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    results = {}
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(num_steps):
                step()
            sync(device)
        events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
        total_us = sum(getattr(e, attr) for e in events) or 1.0
        events.sort(key=lambda e: getattr(e, attr), reverse=True)
        rows = [dict(name=e.key, ms_per_step=getattr(e, attr) / 1e3 / num_steps, share=getattr(e, attr) / total_us,
                     calls_per_step=e.count / num_steps) for e in events[:top]]
        matmul_us = sum(getattr(e, attr) for e in events if MATMUL_KERNEL.search(e.key))
        results[name] = dict(total_ms_per_step=total_us / 1e3 / num_steps, matmul_share=matmul_us / total_us,
                             top=rows)
        print(f"\n{name}: {'kernel' if cuda else 'operator'} time {total_us / 1e3 / num_steps:.2f} ms/step, "
              f"matmul kernels {100 * matmul_us / total_us:.1f}%")
        for row in rows:
            print(f"  {100 * row['share']:5.1f}% {row['ms_per_step']:8.3f} ms {row['calls_per_step']:6.1f}x  "
                  f"{row['name'][:100]}")
    return results
