"""Routing statistics of one MoE layer, kept as summable counts so they aggregate over batches and ranks.

Rates (routing success, dropped fraction, image share per expert, ...) are derived from the counts on demand,
so averaging over many batches weights every token equally instead of averaging ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class MoeStats:
    """Counts for M modalities and E experts; every field is a detached float tensor."""

    modalities: tuple[str, ...]
    tokens_M: torch.Tensor  # valid tokens per modality
    top1_kept_M: torch.Tensor  # valid tokens whose top-1 choice was kept (expert choice: kept by >= 1 expert)
    dropped_M: torch.Tensor  # valid tokens with no kept choice (they skip the MoE branch)
    entropy_sum_M: torch.Tensor  # sum over valid tokens of the clean router entropy (nats)
    routed_ME: torch.Tensor  # assignments asked of each expert, kept or not (expert choice: its picks)
    processed_ME: torch.Tensor  # assignments each expert processed (kept)

    @staticmethod
    def compute(modalities: tuple[str, ...], onehot_SM: torch.Tensor, expert_SK: torch.Tensor,
                kept_SK: torch.Tensor, entropy_S: torch.Tensor, num_experts: int, ranked: bool = True) -> "MoeStats":
        """`onehot_SM` is the modality one-hot of each token, zero rows for padding. `ranked` (`Routing.ranked`):
        column 0 is each token's top choice; False (expert choice, one column per expert): a token's routing
        succeeds if any expert kept it, and an expert is asked for exactly the tokens it picked."""
        onehot_SM = onehot_SM.detach().float()
        kept_SK = kept_SK.float()
        num_modalities = onehot_SM.shape[1]
        modality_S = onehot_SM.argmax(1)
        valid_S = onehot_SM.sum(1)
        # Flat (modality, expert) index of every assignment; scatter-add keeps shapes static (no host sync).
        index_A = (modality_S[:, None] * num_experts + expert_SK).reshape(-1)
        routed = torch.zeros(num_modalities * num_experts, device=onehot_SM.device)
        asked_SK = valid_S[:, None].expand_as(kept_SK) if ranked else kept_SK
        routed.index_add_(0, index_A, asked_SK.reshape(-1))
        processed = torch.zeros_like(routed).index_add_(0, index_A, kept_SK.reshape(-1))
        return MoeStats(
            modalities=modalities,
            tokens_M=onehot_SM.sum(0),
            top1_kept_M=onehot_SM.T @ (kept_SK[:, 0] if ranked else (kept_SK.sum(1) > 0).float()),
            dropped_M=onehot_SM.T @ (kept_SK.sum(1) == 0).float(),
            entropy_sum_M=onehot_SM.T @ entropy_S.detach().float(),
            routed_ME=routed.view(num_modalities, num_experts),
            processed_ME=processed.view(num_modalities, num_experts),
        )

    def __add__(self, other: "MoeStats") -> "MoeStats":
        if other.modalities != self.modalities:
            raise ValueError(f"cannot add stats of modalities {other.modalities} to {self.modalities}")
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "modalities"}
        return MoeStats(modalities=self.modalities, **summed)

    # Derived rates; NaN where the denominator is zero (e.g. a modality absent from the batch).
    @property
    def routing_success_M(self) -> torch.Tensor:
        return self.top1_kept_M / self.tokens_M

    @property
    def dropped_fraction_M(self) -> torch.Tensor:
        return self.dropped_M / self.tokens_M

    @property
    def mean_entropy_M(self) -> torch.Tensor:
        return self.entropy_sum_M / self.tokens_M

    @property
    def modality_share_ME(self) -> torch.Tensor:
        """Fraction of each expert's processed tokens that came from each modality (columns sum to 1)."""
        return self.processed_ME / self.processed_ME.sum(0, keepdim=True)

    def share_of(self, modality: str) -> torch.Tensor:
        """Per expert, the fraction of its processed tokens from `modality` (e.g. "image"): [E]."""
        if modality not in self.modalities:
            raise ValueError(f"modality must be one of {self.modalities}, got {modality!r}")
        return self.modality_share_ME[self.modalities.index(modality)]

    @property
    def expert_load_E(self) -> torch.Tensor:
        """Fraction of all processed assignments that each expert took."""
        processed_E = self.processed_ME.sum(0)
        return processed_E / processed_E.sum()

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars for logging, e.g. {"routing_success/text": 0.97, ...}; modalities with no tokens omitted."""
        out: dict[str, float] = {}
        present = self.tokens_M > 0
        for m, name in enumerate(self.modalities):
            if not present[m]:
                continue
            out[f"{prefix}routing_success/{name}"] = self.routing_success_M[m].item()
            out[f"{prefix}dropped_fraction/{name}"] = self.dropped_fraction_M[m].item()
            out[f"{prefix}router_entropy/{name}"] = self.mean_entropy_M[m].item()
        load_E = self.expert_load_E
        out[f"{prefix}expert_load_max"] = load_E.max().item()
        out[f"{prefix}expert_load_min"] = load_E.min().item()
        return out
