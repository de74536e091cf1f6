"""Old public names that keep working for one release, with a DeprecationWarning.

Tensor names end in their shape (docs/architecture.md, "Shape suffixes"); when a suffix letter changed meaning,
public keyword arguments and dataclass fields took new names. Code written against the old ones still runs, and
is told the new name.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _caller_level() -> int:
    """warnings' stacklevel of the first caller outside this module and torch (whose nn.Module.__call__ sits
    between a model call and its forward)."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and (frame.f_globals.get("__name__") == __name__
                                 or frame.f_globals.get("__name__", "").split(".")[0] == "torch"):
        level, frame = level + 1, frame.f_back
    return level


def renamed_arguments(**old_to_new: str) -> Callable[[F], F]:
    """Decorator: keyword argument `old` is passed on as `new`, with a DeprecationWarning; both is a TypeError.

    Positional calls are untouched. `@renamed_arguments(images_BCHW="images_B3HW")`.
    """
    def decorate(func: F) -> F:
        name = getattr(func, "__qualname__", repr(func))

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if kwargs:  # plain loops: torch.compile traces this on every call of a decorated forward
                for old, new in old_to_new.items():
                    if old in kwargs:
                        if new in kwargs:
                            raise TypeError(f"{name}() got both {old!r} and its new name {new!r}")
                        warnings.warn(f"{name}(): argument {old} is renamed {new}", DeprecationWarning,
                                      stacklevel=_caller_level())
                        kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


class renamed_attribute:
    """A read-only class attribute under an old name that reads the new one, with a DeprecationWarning.

    `ids_BL = renamed_attribute("ids_BT")` in a class body (a dataclass's too: it is no field).
    """

    def __init__(self, new: str):
        self.new = new
        self.message = f"renamed {new}"

    def __set_name__(self, owner: type, name: str) -> None:
        self.message = f"{owner.__name__}.{name} is renamed {self.new}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        warnings.warn(self.message, DeprecationWarning, stacklevel=2)
        return getattr(obj, self.new)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.message}: set {self.new}")
