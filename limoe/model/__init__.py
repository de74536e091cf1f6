"""Model building blocks."""

from limoe.model.mlp import Mlp

__all__ = ["Mlp"]
