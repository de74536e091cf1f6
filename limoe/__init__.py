"""LIMoE in PyTorch: one sparse Mixture-of-Experts transformer shared by images and text."""

__version__ = "0.1.0"

__all__ = ["create_model", "create_model_and_transforms", "get_tokenizer", "list_models", "load_checkpoint"]


def __getattr__(name: str):
    # Lazy, so that `import limoe` (and the command line's --help) does not pay for importing torch.
    if name == "list_models":
        from limoe.model.registry import list_models

        return list_models
    if name in __all__:
        from limoe import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'limoe' has no attribute {name!r}")
