"""LIMoE in PyTorch: one sparse Mixture-of-Experts transformer shared by images and text."""

__version__ = "0.1.0"

from limoe.model.registry import create_model, list_models  # noqa: E402

__all__ = ["create_model", "list_models"]
