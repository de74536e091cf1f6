"""Two-tower baseline: separate image and text encoders of the same size (CLIP / LiT style)."""

from __future__ import annotations

from limoe.model.base import IMAGE, ContrastiveModel
from limoe.model.block import Encoder
from limoe.model.config import ModelConfig


class TwoTower(ContrastiveModel):
    """Each modality has its own encoder; with `moe_layers` set each tower gets its own MoE layers.

    Every token still passes through one encoder of the same width and depth as the one-tower model, so the
    FLOPs per token match while the parameter count doubles.
    """

    def __init__(self, config: ModelConfig):
        if config.kind != "two_tower":
            raise ValueError(f"TwoTower builds kind 'two_tower', got {config.kind!r}")
        super().__init__(config)
        self.image_encoder = self._make_encoder()
        self.text_encoder = self._make_encoder()

    def encoder_for(self, modality: int) -> Encoder:
        return self.image_encoder if modality == IMAGE else self.text_encoder
