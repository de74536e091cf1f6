"""LIMoE train step vs the dense one-tower step on the same batch: pairs/s, ratio, MFU, peak memory.

    python benchmarks/train_step.py --tiny                                   # CPU smoke size (limoe-tiny)
    python benchmarks/train_step.py --preset b16 --batch 256 --json b16.json # CUDA: bf16 autocast, eager
    python benchmarks/train_step.py --preset b16 --batch 256 --compile --profile 3
    python benchmarks/train_step.py --tiny --routing-groups joint per_modality  # both groupings side by side

One step is the training loop's own, `limoe.train.step.train_step` with the default run's settings (AdamW, loss
weights, gradient clipping at 1, no accumulation): forward of images and texts under autocast (bf16 on CUDA,
none on CPU) -> contrastive + weighted aux losses -> backward -> clip -> one host transfer of the loss terms ->
AdamW step. Both models (`limoe-<preset>` and
`dense-<preset>` from the registry) get the same random batch: images, and token ids with random lengths so
that texts carry padding as real captions do. LIMoE routes as it trains: with joint routing groups (the preset
default) one MoE call per MoE block takes a pair's patches and text tokens together; `--routing-groups` times
other groupings too (per_modality: an image call and a text call per MoE block). Steps alternate between the
models (round-robin), so background load slows all alike; `x dense` is dense time / LIMoE time (1.0 = dense
speed).

MFU counts dense-equivalent FLOPs for both models: 3 x the dense model's forward FLOPs per pair
(`get_model_info`, which counts matmul FLOPs at 2 per multiply-add, attention included), divided by time and
by --peak-tflops (default 989: the H200's dense bf16 datasheet rate). LIMoE's router and its dispatch are
overhead in this count, not work.
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

from limoe.data import PairBatch  # noqa: E402
from limoe.factory import create_model  # noqa: E402
from limoe.model import get_config, get_model_info  # noqa: E402
from limoe.moe.layer import ROUTING_GROUPS  # noqa: E402
from limoe.parallel.strategy import Strategy  # noqa: E402
from limoe.parallel.world import World  # noqa: E402
from limoe.train.config import TrainConfig  # noqa: E402
from limoe.train.optim import make_optimizer  # noqa: E402
from limoe.train.step import train_step  # noqa: E402

PRESETS = ("s32", "b32", "b16", "l16")


def make_batch(config, batch: int, device: torch.device, seed: int = 0) -> PairBatch:
    """Random images [B, 3, H, W] and token ids [B, T] with 1..T real tokens each (padding id 0 after them)."""
    gen = torch.Generator().manual_seed(seed)
    images_B3HW = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)
    length = config.context_length
    ids_BT = torch.randint(1, config.vocab_size, (batch, length), generator=gen)
    lengths_B = torch.randint(1, length + 1, (batch,), generator=gen)
    padding_BT = torch.arange(length)[None, :] >= lengths_B[:, None]
    return PairBatch(images_B3HW, ids_BT.masked_fill(padding_BT, 0), padding_BT, lengths_B - 1,
                     [""] * batch).to(device)


def make_step(model, batch: PairBatch, device: torch.device, precision: str, compile_model: bool):
    """A closure running the training loop's step (`train_step`) of `model` on `batch`; returns the total loss."""
    cfg = TrainConfig(precision=precision)
    strategy = Strategy(World(), device)
    runner = strategy.runner(model, compile_model)
    optimizer = make_optimizer(model, cfg.optim)
    return lambda: train_step(runner, model, optimizer, strategy, batch, cfg, device).sums["total_loss"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="b16", help="model size: limoe-<preset> vs dense-<preset>")
    parser.add_argument("--tiny", action="store_true", help="limoe-tiny vs dense-tiny (CPU-sized), overrides --preset")
    parser.add_argument("--batch", type=int, help="image-text pairs per step (default: 256 on CUDA, 8 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="autocast dtype; auto: bf16 on CUDA, fp32 (no autocast) elsewhere")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--moe-layers", help="override the LIMoE preset's MoE placement, e.g. every:2")
    parser.add_argument("--experts", type=int, help="override the LIMoE preset's number of experts")
    parser.add_argument("--expert-backend", choices=["auto", "bmm", "grouped_mm"], default="auto")
    parser.add_argument("--routing-groups", nargs="+", choices=ROUTING_GROUPS, default=["joint"],
                        help="LIMoE groupings to time, each against the same dense steps (default: joint)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (compilation)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense rate for MFU (bf16 H200: 989)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps per model")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows (and the profile) to this JSON file")
    args = parser.parse_args(argv)
    for flag in ("batch", "reps", "experts", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    for flag in ("warmup", "profile"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not args.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name, _ = autocast_dtype(args.dtype, device)
    batch_size = args.batch or (256 if device.type == "cuda" else 8)
    variant = "tiny" if args.tiny else args.preset
    dense = f"dense-{variant}"
    presets, overrides = {dense: dense}, {dense: {}}
    for grouping in args.routing_groups:  # one LIMoE model per grouping, named by it when there are several
        name = f"limoe-{variant}" + (f"/{grouping}" if len(args.routing_groups) > 1 else "")
        moe_overrides = {"expert_backend": args.expert_backend, "routing_groups": grouping}
        if args.experts:
            moe_overrides["num_experts"] = args.experts
        presets[name] = f"limoe-{variant}"
        overrides[name] = {"moe": moe_overrides, **({"moe_layers": args.moe_layers} if args.moe_layers else {})}
    infos = {name: get_model_info(presets[name], **overrides[name]) for name in presets}
    train_flops_per_pair = 3 * infos[dense].flops_per_pair  # forward + backward (2x forward)

    torch.manual_seed(0)
    config = get_config(dense)
    batch = make_batch(config, batch_size, device)
    steps = {}
    for name in presets:
        torch.manual_seed(0)
        model = create_model(presets[name], **overrides[name]).to(device).train()
        steps[name] = make_step(model, batch, device, dtype_name, args.compile)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({gpu}) threads={torch.get_num_threads()} torch={torch.__version__} dtype={dtype_name} "
          f"compile={args.compile} batch={batch_size} dense-equivalent train GFLOPs/pair="
          f"{train_flops_per_pair / 1e9:.2f} peak={args.peak_tflops} TFLOP/s")
    measured = time_interleaved(steps, device, args.reps, args.warmup)
    losses = {name: step() for name, step in steps.items()}  # one more step each (a non-finite loss raises)
    dense_ms = measured[dense][0]
    print(f"{'model':<24}{'ms/step':>10}{'pairs/s':>10}{'x dense':>9}{'MFU':>8}{'peak MiB':>10}{'params':>10}")
    rows = []
    for name, (ms, peak) in measured.items():
        pairs_per_s = batch_size / ms * 1e3
        row = dict(model=name, compile=args.compile, dtype=dtype_name, batch=batch_size, ms=ms,
                   pairs_per_s=pairs_per_s, ratio_to_dense=dense_ms / ms,
                   mfu=pairs_per_s * train_flops_per_pair / (args.peak_tflops * 1e12), peak_mib=peak,
                   total_params=infos[name].total_params, active_params=infos[name].active_params,
                   train_flops_per_pair=train_flops_per_pair, loss=losses[name], device=gpu, torch=torch.__version__)
        rows.append(row)
        print(f"{name:<24}{ms:>10.1f}{pairs_per_s:>10.1f}{row['ratio_to_dense']:>9.2f}{100 * row['mfu']:>7.2f}%"
              f"{peak:>10.0f}{infos[name].total_params / 1e6:>9.1f}M", flush=True)
    profile = profile_top(steps, device, args.profile) if args.profile else None
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "profile": profile}, indent=2))
    return rows


if __name__ == "__main__":
    main()
