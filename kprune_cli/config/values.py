"""Checked reads of config values: each bad value is a one-line :class:`UserError` naming the key,
the value and what is allowed (Hydra hands over whatever the command line said: ``seed=abc``,
``overwrite=maybe``, ``pruner.batch_size=2.5``)."""

from __future__ import annotations

import math
import re
import types
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from kprune_cli.runtime.errors import UserError

SEED_LIMIT = 2**32
"""Seeds are integers in ``[0, SEED_LIMIT)``, a range every seeded generator accepts (NumPy, torch)."""

_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
# What each checkable type annotation accepts, in words.
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def resolve_config(cfg: DictConfig) -> None:
    """A :class:`UserError` for a mandatory value left unset (``???``) or an interpolation that
    does not resolve; nothing otherwise."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise UserError(f"{error.full_key} is not set: pass {error.full_key}=<value> on the command line") from None
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"config value {error.full_key or '?'} cannot be resolved: {message}") from None


@contextmanager
def required_keys() -> Iterator[None]:
    """Turn reading a key that the command line deleted (``~seed``) into a :class:`UserError`."""
    try:
        yield
    except (ConfigAttributeError, ConfigKeyError) as error:
        raise UserError(f"the config has no {error.full_key}: it is required (remove the override that "
                        f"deleted it)") from None


def check_rate(rate: Any) -> float:
    """``rate`` as a float in (0, 1), or a :class:`UserError` naming it."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise UserError(f"rate={rate!r} is not a number: give the fraction of FLOPs to remove, 0 < rate < 1") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"rate={rate!r} is out of range: give the fraction of FLOPs to remove, 0 < rate < 1")
    return value


def check_int(key: str, value: Any, minimum: int, limit: int | None = None) -> int:
    """``value`` as an integer with ``minimum <= value < limit`` (no upper bound without ``limit``).

    Whole floats (``1e5``) and digit strings count as integers; booleans do not.
    """
    number = _as_int(value)
    if number is None or number < minimum or (limit is not None and number >= limit):
        allowed = f"an integer >= {minimum}" if limit is None else f"an integer from {minimum} to {limit - 1}"
        raise UserError(f"{key}={value!r} is not allowed: give {allowed}")
    return number


def check_optional_int(key: str, value: Any, minimum: int, limit: int | None = None) -> int | None:
    """``None`` for ``null``, else :func:`check_int`'s integer; its message says ``null`` is allowed too."""
    if value is None:
        return None
    try:
        return check_int(key, value, minimum, limit)
    except UserError as error:
        raise UserError(f"{error} or null") from None


def check_float(key: str, value: Any, minimum: float, maximum: float = math.inf, *,
                above_minimum: bool = False) -> float:
    """``value`` as a float with ``minimum <= value <= maximum`` (``minimum < value`` with
    ``above_minimum``, for a value that must not be zero, such as a learning rate).

    Integers and number strings count as numbers; booleans, NaN and infinities do not.
    """
    number = _as_float(value)
    if number is None or number < minimum or (above_minimum and number == minimum) or number > maximum:
        raise UserError(f"{key}={value!r} is not allowed: give {_number_range(minimum, maximum, above_minimum)}")
    return number


def check_bool(key: str, value: Any) -> bool:
    """``value`` if it is a boolean (``true`` / ``false`` on the command line)."""
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} is not allowed: give true or false")
    return value


PRECISION_NAMES = ("fp32", "bf16", "fp16")
"""Names of a forward pass's precision (``eval_dtype``, ``kprune bench dtype``); their dtypes are
:data:`kprune_cli.runtime.precision.PRECISIONS` (torch is not imported here)."""


def check_precision(key: str, value: Any) -> str:
    """``value`` if it is one of :data:`PRECISION_NAMES`."""
    if value not in PRECISION_NAMES:
        raise UserError(f"{key}={value!r} is not allowed: give {', '.join(PRECISION_NAMES)}")
    return str(value)


def check_argument_types(target: Callable[..., Any], values: dict[str, Any], prefix: str) -> None:
    """A :class:`UserError` for the first of ``values`` whose type ``target``'s annotations rule out.

    Only annotations made of ``bool``, ``int``, ``float``, ``str`` and ``None`` (and unions of
    them) are checked; an int passes for a float, a bool for nothing but a bool. ``prefix`` names
    the config group in the message (``"pruner."``).
    """
    function = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):  # annotations that do not evaluate here: nothing to check
        return
    for key, value in values.items():
        allowed = _simple_types(hints.get(key))
        if allowed and not _fits(value, allowed):
            words = " or ".join(_TYPE_WORDS[kind] for kind in allowed)
            raise UserError(f"{prefix}{key}={value!r} is not allowed: give {words}")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _number_range(minimum: float, maximum: float, above_minimum: bool) -> str:
    """The numbers :func:`check_float` accepts, in words."""
    lowest = f"> {minimum:g}" if above_minimum else f">= {minimum:g}"
    if maximum == math.inf:
        return f"a number {lowest}"
    return f"a number {lowest} and <= {maximum:g}" if above_minimum else f"a number from {minimum:g} to {maximum:g}"


def _simple_types(hint: Any) -> tuple[type, ...] | None:
    """The types of an annotation made only of :data:`_TYPE_WORDS`' types, else None (unchecked)."""
    if hint is None:
        return None
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    return args if all(arg in _TYPE_WORDS for arg in args) else None


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return any(isinstance(value, kind) for kind in allowed if kind is not bool)
