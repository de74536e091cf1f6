"""One-tower models: LIMoE (sparse MoE MLPs) and its dense baseline share every block between modalities."""

from __future__ import annotations

from limoe.model.base import ContrastiveModel
from limoe.model.block import Encoder
from limoe.model.config import ModelConfig


class OneTower(ContrastiveModel):
    """Images and texts share one encoder: pairs go through it in lockstep (`forward`, training), a modality
    alone in its own pass (`encode_image`, `encode_text`).

    `config.kind == "limoe"` puts `MoeMlp` at `config.moe_layer_ids`; `"dense"` uses a plain MLP everywhere.
    """

    def __init__(self, config: ModelConfig):
        if config.kind not in ("limoe", "dense"):
            raise ValueError(f"OneTower builds kind 'limoe' or 'dense', got {config.kind!r}")
        super().__init__(config)
        self.encoder = self._make_encoder()

    def encoder_for(self, modality: int) -> Encoder:
        return self.encoder
