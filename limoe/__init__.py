"""LIMoE in PyTorch: one sparse Mixture-of-Experts transformer shared by images and text."""

__version__ = "0.1.0"
