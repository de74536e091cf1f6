"""Checked config fields: each dataclass field declares its type and range next to its default, one pass checks them.

    lr: float = option(1e-3, real(gt=0))
    schedule: str = option("cosine", one_of("cosine", "rsqrt", "constant"))
    train: str | None = option(None, text(none=True))  # free-form (a path)

`check_fields(obj)` checks every field of a config dataclass (recursing into sections and keyed dicts) and raises a
ConfigError whose one line names the dotted key, e.g. `optim.beta1 must be in [0, 1), got 1.5`. A field declared
without a check is a programming error (TypeError), so a new field cannot slip past validation unchecked.
Checks that involve several fields stay with the dataclass that owns them, which names its fields bare (`k must
be in [1, num_experts=4]`) as it does not know the key users reach it by; `dotted(message, keys)` names them as
typed in `--set` (`moe.k must be in [1, moe.num_experts=4]`) where that key is known.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable

from limoe.errors import UserError

# The largest float32: training runs in float32 (or lower), so a larger number overflows to inf there.
FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(UserError, ValueError):
    """A bad preset, key or value; its message is the one line the command line prints."""


@dataclass(frozen=True)
class Check:
    """What one field accepts: its type(s), then (for values) a range, allowed names or a rule of its own."""

    kinds: tuple[type, ...]  # int, float, bool, str, dict, tuple (a JSON list) or a config dataclass (a section)
    none: bool = False  # None is allowed (and means "off" / "the default", as the field's comment says)
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    item: Check | None = None  # each element of a tuple, each value of a dict with free keys
    keys: dict[str, Check] | None = None  # a dict with a fixed set of keys (model / MoE overrides)
    rule: Callable[[Any], str | None] | None = None  # returns what is wrong ("must be ..."), or None

    def __call__(self, key: str, value: Any, values: bool = True) -> None:
        """Raise ConfigError naming `key` if `value` has the wrong type or (with `values`) a bad value."""
        if value is None:
            if not self.none:
                raise ConfigError(f"{key}: expected {self.expected()}, got None")
            return
        if not any(_is(value, kind) for kind in self.kinds):
            raise ConfigError(f"{key}: expected {self.expected()}, got {value!r}")
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.", values)
            return
        if isinstance(value, dict):
            self._check_dict(key, value, values)
        elif isinstance(value, (tuple, list)) and self.item is not None:
            for i, element in enumerate(value):
                self.item(f"{key}[{i}]", element, values)
        if not values:
            return
        fractional = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
        if fractional and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ConfigError(f"{key} must be a finite number within float32 range, got {value!r}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{key} must be one of {self.choices}, got {value!r}")
        if isinstance(value, numbers.Real) and not self.in_range(value):
            raise ConfigError(f"{key} must be {self.range()}{' or None' if self.none else ''}, got {value!r}")
        problem = self.rule(value) if self.rule else None
        if problem:
            raise ConfigError(f"{key} {problem}")

    def _check_dict(self, key: str, value: dict, values: bool) -> None:
        for name, element in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"{key}: keys must be names, got {name!r}")
            if self.keys is not None and name not in self.keys:
                raise ConfigError(f"unknown option '{key}.{name}'; {key}.* keys: {sorted(self.keys)}")
            check = self.keys[name] if self.keys is not None else self.item
            if check is not None:
                check(f"{key}.{name}", element, values)

    def in_range(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def expected(self) -> str:
        names = [_NAMES.get(kind, kind.__name__) for kind in self.kinds]
        return " or ".join(names + (["None"] if self.none else []))

    def range(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return next(f"{op} {bound}" for op, bound in bounds if bound is not None)


_NAMES = {int: "an int", float: "a float", bool: "a bool", str: "a str", dict: "a dict", tuple: "a list"}


def _is(value: Any, kind: type) -> bool:
    # bool is an int subclass in Python, but `true` where a count belongs is a mistake; ints are fine as floats.
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, (tuple, list))  # JSON has lists only
    return isinstance(value, kind)


# -- declaring fields -----------------------------------------------------------------------------------------
def option(default: Any = dataclasses.MISSING, check: Check | None = None, *, factory: Any = dataclasses.MISSING,
           key: str | None = None) -> Any:
    """A dataclass field with its check; `key`: the name users write, if not the field's (model_args -> model)."""
    if check is None:
        raise TypeError("option() needs a check")
    metadata = {"check": check, **({"key": key} if key else {})}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def integer(*, none: bool = False, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Check:
    return Check((int,), none=none, ge=ge, gt=gt, le=le, lt=lt)


def real(*, none: bool = False, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None) -> Check:
    """A finite float (ints accepted) within float32 range, and within the bounds given."""
    return Check((float,), none=none, ge=ge, gt=gt, le=le, lt=lt)


def flag() -> Check:
    return Check((bool,))


def one_of(*names: str, none: bool = False) -> Check:
    return Check((str,), none=none, choices=tuple(names))


def text(*, none: bool = False, rule: Callable[[Any], str | None] | None = None) -> Check:
    """A free-form string (a path, a column name), optionally with a rule of its own."""
    return Check((str,), none=none, rule=rule)


def sequence(item: Check, *, none: bool = False, rule: Callable[[Any], str | None] | None = None) -> Check:
    """A tuple (or JSON list) whose elements each pass `item`."""
    return Check((tuple,), none=none, item=item, rule=rule)


def mapping(item: Check | None = None, *, keys: dict[str, Check] | None = None) -> Check:
    """A dict with free string keys whose values pass `item`, or with the fixed `keys` and their own checks."""
    return Check((dict,), item=item, keys=keys)


def section(cls: type) -> Any:
    """A nested config dataclass, checked field by field."""
    return option(check=Check((cls,)), factory=cls)


def field_checks(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Check]:
    """Name -> check of a config dataclass's fields (e.g. the keys a dict of overrides for it may hold)."""
    return {f.name: _check_of(cls, f) for f in dataclasses.fields(cls) if f.name not in exclude}


def _check_of(cls: type, f: dataclasses.Field) -> Check:
    if "check" not in f.metadata:
        raise TypeError(f"{cls.__name__}.{f.name} declares no check: declare it with option(default, check)")
    return f.metadata["check"]


def check_fields(obj: Any, prefix: str = "", values: bool = True) -> None:
    """Check every field of config dataclass `obj`; `values=False` checks only the types (a file just read)."""
    for f in dataclasses.fields(obj):
        _check_of(type(obj), f)(prefix + f.metadata.get("key", f.name), getattr(obj, f.name), values)


def dotted(message: str, keys: dict[str, str]) -> str:
    """`message` with every bare field name of `keys` ("k") replaced by the key users type ("moe.k"); names
    already dotted (moe.k) are left alone."""
    if not keys:
        return message
    names = "|".join(sorted(map(re.escape, keys), key=len, reverse=True))  # the longest name first
    return re.sub(rf"(?<![\w.'])({names})\b", lambda m: keys[m.group(1)], message)


def field_keys(cls: type, prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Field name -> the dotted key users type for it, e.g. {"k": "moe.k", ...} for (MoeConfig, "moe.")."""
    return {f.name: prefix + f.metadata.get("key", f.name) for f in dataclasses.fields(cls) if f.name not in exclude}
