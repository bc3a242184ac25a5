"""Argument checks shared by the library and the configs: every one raises a ConfigError naming the field.

``is_int`` / ``is_number`` refuse ``bool`` (``True`` is an ``int`` to Python, never a step count to us);
:class:`Param` declares one hyperparameter (type, default, range or choices, and the size a dry run uses)
so that an attack states its arguments once and a config is checked against them before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError


def is_int(value: Any) -> bool:
    """An ``int``, not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float``, not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_range(
    where: str, value: float, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """Raise ConfigError unless ``value`` lies in the given range (and is finite)."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high
    )
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ConfigError(
            f"{where} = {value!r} is out of range; it must be {' and '.join(x for x in (lo, hi) if x)}"
        )


def check_int(where: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within [low, high]; a bool, a float or a string is a ConfigError."""
    if not is_int(value):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    check_range(where, value, low=low, high=high)
    return int(value)


def check_number(
    where: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a finite float within the range; a bool or a string is a ConfigError."""
    if not is_number(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    check_range(where, value, low=low, high=high, low_open=low_open)
    return float(value)


def check_choice(where: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ConfigError listing them."""
    if not any(value == c and type(value) is type(c) for c in choices):
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"{where} = {value!r} is not allowed; allowed values: {allowed}")
    return value


REQUIRED = object()  # the default of a Param that must be given
FROM_SIGNATURE = object()  # not declared: an attack's Param takes its constructor's default


@dataclasses.dataclass(frozen=True)
class Param:
    """One declared hyperparameter: its types, default, and range or choices.

    Args:
        types: the accepted type or types; ``int`` values are accepted where ``float`` is, a list where
            ``tuple`` is, and ``bool`` only where it is named.
        default: the value used when it is not given (``REQUIRED``: must be given). An attack declares it
            without one: the constructor's default is filled in when the class is made.
        low, high, low_open: the range of a number (``low_open``: ``> low`` rather than ``>= low``).
        choices: the allowed values (of any of ``types``).
        optional: ``None`` is accepted too.
        length: the length of a tuple value; ``items``: the type of its items.
        doc: one line for messages and listings.
        dry_run: the value a dry run uses whatever is configured (e.g. ``1`` for a number of steps), so
            that every cell of a grid runs in seconds; a mapping is merged into the configured one (or the
            default). ``None``: a dry run keeps the configured value. It must fit the declaration.
    """

    types: type | Tuple[type, ...]
    default: Any = FROM_SIGNATURE
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    choices: Tuple[Any, ...] = ()
    optional: bool = False
    length: Optional[int] = None
    items: Optional[type] = None
    doc: str = ""
    dry_run: Any = None

    def __post_init__(self) -> None:
        if self.dry_run is not None:
            self.check("dry_run", self.dry_run)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED or self.default is FROM_SIGNATURE  # no default known: must be given

    def check(self, where: str, value: Any) -> None:
        """Raise a ConfigError naming ``where`` unless ``value`` fits this declaration."""
        if value is None and (self.optional or self.default is None):
            return
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        if not _is_instance(value, types):
            names = " or ".join(t.__name__ for t in types) + (" or null" if self.optional else "")
            raise ConfigError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")
        if self.choices:
            check_choice(where, value, self.choices)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(where, value, low=self.low, high=self.high, low_open=self.low_open)
        if isinstance(value, (tuple, list)):
            if self.length is not None and len(value) != self.length:
                raise ConfigError(f"{where} must hold {self.length} values, got {len(value)}: {value!r}")
            if self.items is not None:
                for k, item in enumerate(value):
                    Param(self.items, low=self.low, high=self.high, low_open=self.low_open).check(
                        f"{where}[{k}]", item
                    )


def _is_instance(value: Any, types: Tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    if isinstance(value, list) and tuple in types:
        return True
    return isinstance(value, types)


def check_params(owner: str, declared: Mapping[str, Param], given: Mapping[str, Any]) -> None:
    """Check ``given`` against ``declared``: unknown keys (with the closest known one), wrong types,
    out-of-range values and missing required ones are ConfigErrors that name ``owner.key``."""
    for key, value in given.items():
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"{owner} takes no parameter {key!r}.{hint} Known: {known}")
        declared[key].check(f"{owner}.{key}", value)
    missing = [k for k, p in declared.items() if p.required and k not in given]
    if missing:
        raise ConfigError(f"{owner} needs {', '.join(missing)}")
