"""`limoe demo`: train one MoE layer on two synthetic token modalities and report routing health.

Image-like tokens are many and come from 6 clusters; text-like tokens are 4x fewer, padded, and come from 3 other
clusters; every cluster has its own target map, so experts that specialise win. Both modalities share one routing
group and one capacity per expert, in shuffled order, as the LIMoE model routes a batch of pairs. Two variants
train side by side: plain top-1 routing and LIMoE's recipe (per-modality entropy losses + Batch Priority
Routing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from limoe.errors import UserError
from limoe.moe import MoeConfig, MoeMlp, MoeStats

DIM, HIDDEN, EXPERTS = 32, 64, 8


@dataclass
class Variant:
    name: str
    batch_priority: bool
    loss_weights: dict[str, float]


VARIANTS = [
    Variant("plain top-1", batch_priority=False, loss_weights={}),
    Variant("LIMoE aux + BPR", batch_priority=True, loss_weights={
        "importance": 0.005, "load": 0.005, "local_entropy/image": 0.02, "local_entropy/text": 0.02,
        "global_entropy/image": 0.1, "global_entropy/text": 0.1}),
]


class TwoModalityTask:
    """Clustered tokens with a per-cluster target y = tanh(x A_c)."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        self.centers_Yd = 3.0 * torch.randn(9, DIM, generator=gen)  # the classes: clusters 0-5 image, 6-8 text
        self.maps_Ydd = torch.randn(9, DIM, DIM, generator=gen) / DIM**0.5

    def sample(self, num_tokens: int, clusters: range) -> tuple[torch.Tensor, torch.Tensor]:
        c_S = torch.randint(clusters.start, clusters.stop, (num_tokens,), generator=self.gen)
        x_Sd = self.centers_Yd[c_S] + torch.randn(num_tokens, DIM, generator=self.gen)
        return x_Sd, torch.tanh(torch.einsum("sd,sde->se", x_Sd, self.maps_Ydd[c_S]))

    def group(self, tokens: int) -> tuple[torch.Tensor, ...]:
        """One routing group: x, target, modality id and validity of every token, modalities shuffled together."""
        text_tokens = tokens // 5
        x_img, y_img = self.sample(tokens - text_tokens, range(0, 6))
        x_txt, y_txt = self.sample(text_tokens, range(6, 9))
        modality_S = torch.cat([torch.zeros(tokens - text_tokens, dtype=torch.long),
                                torch.ones(text_tokens, dtype=torch.long)])
        # A quarter of the text positions are padding.
        valid_S = torch.cat([torch.ones(tokens - text_tokens, dtype=torch.bool),
                             torch.rand(text_tokens, generator=self.gen) > 0.25])
        order_S = torch.randperm(tokens, generator=self.gen)
        return tuple(t[order_S] for t in (torch.cat([x_img, x_txt]), torch.cat([y_img, y_txt]), modality_S, valid_S))


def train_variant(variant: Variant, task_seed: int, tokens: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    task = TwoModalityTask(task_seed)
    layer = MoeMlp(MoeConfig(DIM, HIDDEN, num_experts=EXPERTS, batch_priority=variant.batch_priority))
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(steps):
        x_Sd, y_Sd, modality_S, valid_S = task.group(tokens)
        out_Sd, aux = layer(x_Sd, modality=modality_S, valid=valid_S)
        per_token_S = (out_Sd - y_Sd).square().mean(-1)
        # Each modality's mean error counts equally, however few its tokens.
        mse = sum(per_token_S[valid_S & (modality_S == m)].mean() for m in (0, 1)) / 2
        aux = sum(w * aux.losses[name] for name, w in variant.loss_weights.items())
        opt.zero_grad(set_to_none=True)
        (mse + aux).backward()
        opt.step()
    seconds = time.perf_counter() - start

    layer.train()  # measure routing as it happens in training (train capacity, noise on)
    stats: MoeStats | None = None
    with torch.no_grad():
        for _ in range(10):
            x_Sd, _, modality_S, valid_S = task.group(tokens)
            step_stats = layer(x_Sd, modality=modality_S, valid=valid_S)[1].stats
            stats = step_stats if stats is None else stats + step_stats
    return {"mse": mse.item(), "stats": stats, "seconds": seconds}


def run_demo(tokens: int = 2048, steps: int = 200, seed: int = 0) -> int:
    if tokens < 10 or steps < 1:
        raise UserError(f"--tokens must be >= 10 and --steps >= 1, got {tokens} and {steps}")
    print(f"Training one MoE layer (d={DIM}, h={HIDDEN}, E={EXPERTS}, top-1, capacity factor 1.0) for {steps} "
          f"steps of {tokens} tokens (4:1 image:text), two variants...")
    results = {v.name: train_variant(v, task_seed=seed, tokens=tokens, steps=steps, seed=seed) for v in VARIANTS}
    print(f"\n{'variant':<18}{'final mse':>10}{'success img':>13}{'success txt':>13}{'dropped txt':>13}{'s':>7}")
    for name, r in results.items():
        s = r["stats"]
        print(f"{name:<18}{r['mse']:>10.4f}{s.routing_success_M[0]:>13.3f}{s.routing_success_M[1]:>13.3f}"
              f"{s.dropped_fraction_M[1]:>13.3f}{r['seconds']:>7.1f}")
    for name, r in results.items():
        share = " ".join(f"{100 * v:3.0f}%" for v in r["stats"].share_of("image").nan_to_num(0.0).tolist())
        print(f"\nImage share of each expert's tokens, {name}:\n  {share}")
    return 0
