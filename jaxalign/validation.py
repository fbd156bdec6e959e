"""Rules for configuration values, each able to say what it allows.

Every config dataclass checks all of its fields in ``__post_init__`` with
:func:`check_fields` and one :class:`Rule` per field, so a value is refused where it
is made (a YAML file, a ``key=value`` override, or Python) and before anything runs.
The command line's argparse ``type=`` functions are built from the same rules
(:mod:`jaxalign.cli.flags`). A refused value is a :class:`ConfigError` that names the
dotted key, the value and what is allowed::

    train.learning_rate must be a finite number > 0, got -1.0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message says where and why."""


def show(value: Any) -> str:
    """``value`` as a user wrote it in YAML: lists for tuples, ``null`` for None."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A test on one value, and the words that complete "must be ..." when it fails.

    ``normalise`` turns an accepted value into the form the dataclass stores (a list
    into a hashable tuple).
    """

    accepts: Callable[[Any], bool]
    allowed: str
    normalise: Callable[[Any], Any] | None = None

    def check(self, key: str, value: Any) -> Any:
        """``value`` (normalised) if the rule accepts it, else a ConfigError naming ``key``."""
        try:
            ok = bool(self.accepts(value))
        except (TypeError, ValueError):  # e.g. comparing a string with a number
            ok = False
        if not ok:
            raise ConfigError(f"{key} must be {self.allowed}, got {show(value)}")
        return self.normalise(value) if self.normalise else value


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer; ``True``/``False`` are not numbers here."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An integer or float that is neither NaN nor infinite (booleans excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _bounds_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _within(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def integer(low: int | None = None, high: int | None = None) -> Rule:
    """An integer in ``[low, high]`` (either end may be open-ended: None)."""
    return Rule(
        lambda v: is_integer(v) and _within(v, low, high, False, False),
        "an integer" + _bounds_text(low, high, False, False),
    )


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Rule:
    """A finite number between ``low`` and ``high``, each end closed unless ``*_open``."""
    return Rule(
        lambda v: is_finite_number(v) and _within(v, low, high, low_open, high_open),
        "a finite number" + _bounds_text(low, high, low_open, high_open),
    )


def one_of(*choices: str) -> Rule:
    """One of the strings ``choices``."""
    return Rule(lambda v: isinstance(v, str) and v in choices, f"one of {', '.join(choices)}")


def optional(rule: Rule) -> Rule:
    """``None`` (YAML ``null``) or a value ``rule`` accepts."""
    return Rule(lambda v: v is None or rule.accepts(v), f"null or {rule.allowed}", rule.normalise)


def list_of(item: Rule, *, non_empty: bool = False, unique: bool = False) -> Rule:
    """A list (stored as a tuple) whose items ``item`` accepts."""

    def accepts(v):
        if not isinstance(v, tuple | list) or (non_empty and not v):
            return False
        if unique and len(set(v)) != len(v):
            return False
        return all(item.accepts(x) for x in v)

    what = ("a non-empty list" if non_empty else "a list") + (" without repeats" if unique else "")
    return Rule(accepts, f"{what} whose items are each {item.allowed}", tuple)


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str), "a string")
NON_EMPTY_TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
# NumPy's generators refuse negative seeds, and ``jax.random.key`` takes at most an
# int64, which run.seed * 1000 + round must stay within: 32 bits leave room for both.
SEED = integer(0, 2**32 - 1)


def check_fields(obj: Any, group: str, rules: Mapping[str, Rule]) -> None:
    """Checks every field of dataclass ``obj`` with its rule; ``group`` is its dotted prefix.

    ``rules`` must name every field: a field without a rule is a programming error
    (TypeError), so a field cannot be added without deciding what it accepts.
    """
    names = [f.name for f in dataclasses.fields(obj)]
    if set(names) != set(rules):
        raise TypeError(
            f"{type(obj).__name__}: fields without a rule {sorted(set(names) - set(rules))}, "
            f"rules without a field {sorted(set(rules) - set(names))}"
        )
    for name in names:
        value = rules[name].check(f"{group}.{name}", getattr(obj, name))
        if value is not getattr(obj, name):
            object.__setattr__(obj, name, value)  # frozen: store the normalised form


def require(condition: bool, message: str) -> None:
    """A rule between fields: ``message`` names the keys, their values and what is allowed."""
    if not condition:
        raise ConfigError(message)
