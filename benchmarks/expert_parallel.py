"""Expert-parallel MoE layer vs the single-process layer on the same per-rank tokens: forward+backward time.

    python benchmarks/expert_parallel.py                    # CPU, gloo, 2 ranks: d=256, h=1024, 4096 tokens/rank
    python benchmarks/expert_parallel.py --ranks 4 --experts 32 --threads 2

Spawns --ranks processes (gloo on CPU, NCCL with --device cuda, one GPU per rank). On every rank, three steps are
timed round-robin, each after a barrier so that all ranks start it together:
  single      MoeMlp with all E experts on this rank's tokens (no communication; the same expert FLOPs per rank
              as the EP layer, whose E/P experts see P times more rows)
  expert-par  ExpertParallelMoeMlp (E/P experts per rank) on the same tokens: 2 all_to_all forward, 2 backward
  a2a only    the 4 all_to_all exchanges of the [E, C, d] buffer alone
Ratios are relative to `single`; `expert-par / single - 1` is the exchange overhead. Rank 0's medians are printed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from limoe.moe import MoeConfig, MoeMlp  # noqa: E402
from limoe.moe.parallel import ExpertParallelMoeMlp, load_full_state_dict  # noqa: E402
from limoe.parallel.collectives import all_to_all  # noqa: E402
from limoe.parallel.mesh import expert_parallel_groups  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks, timeout=timedelta(seconds=300))
    groups = expert_parallel_groups(args.ranks, args.experts)
    cfg = MoeConfig(args.dim, args.hidden, num_experts=args.experts, k=args.k, capacity_factor=args.capacity_factor)
    torch.manual_seed(0)
    single = MoeMlp(cfg).to(device).train()
    ep = ExpertParallelMoeMlp(cfg, groups).to(device).train()
    load_full_state_dict(ep, single.state_dict(), groups)
    torch.manual_seed(1 + rank)
    x_Sd = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    buf_ECd = torch.randn(args.experts, single.capacity_for(args.tokens), args.dim, device=device)

    def layer_step(layer):
        def step():
            y, aux = layer(x_Sd)
            (y.sum() + sum(aux.losses.values())).backward()
        return step

    def a2a_step():
        for _ in range(4):
            all_to_all(buf_ECd, groups.ep_group)

    steps = {"single": layer_step(single), "expert-par": layer_step(ep), "a2a only": a2a_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(args.warmup + args.reps):
        for name, step in steps.items():  # round-robin: background load slows every variant alike
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if rep >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    if rank == 0:
        Path(out).write_text(json.dumps({name: statistics.median(t) for name, t in times.items()}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (one routing group)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(_rank_main, args=(args, _free_port(), out), nprocs=args.ranks)
        medians = json.loads(Path(out).read_text())
    print(f"device={args.device} ranks={args.ranks} threads/rank={args.threads} torch={torch.__version__} "
          f"d={args.dim} h={args.hidden} tokens/rank={args.tokens} E={args.experts} k={args.k} "
          f"cf={args.capacity_factor}")
    print(f"{'variant':<14}{'ms':>9}{'x single':>10}")
    rows = []
    for name, ms in medians.items():
        rows.append(dict(variant=name, ms=ms, ratio_to_single=ms / medians["single"]))
        print(f"{name:<14}{ms:>9.2f}{ms / medians['single']:>10.2f}")
    print(f"exchange overhead: {medians['expert-par'] / medians['single'] - 1:+.1%} of the single-process step")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
