"""Model building blocks, the one-tower (LIMoE, dense) and two-tower models, and the preset registry."""

from limoe.model.base import ContrastiveModel, ModelOutput
from limoe.model.block import Attention, Block, Encoder
from limoe.model.config import ModelConfig
from limoe.model.flops import ModelInfo, model_info
from limoe.model.mlp import Mlp
from limoe.model.one_tower import OneTower
from limoe.model.registry import build_model, get_config, get_model_info, list_models
from limoe.model.two_tower import TwoTower

__all__ = [
    "Attention", "Block", "ContrastiveModel", "Encoder", "Mlp", "ModelConfig", "ModelInfo", "ModelOutput",
    "OneTower", "TwoTower", "build_model", "get_config", "get_model_info", "list_models",
    "model_info",
]
