"""argparse ``type=`` functions for numeric flags, built from the config rules.

Each turns the flag's text into a value or stops the command with argparse's usage
error (exit status 2, before anything is read or written) naming the flag, the value
and what is allowed::

    jaxalign generate: error: argument --n: must be an integer >= 1, got '0'

Every numeric flag of every command uses one of these (``tests/test_cli_flags.py``
checks), so a command never starts on a value it cannot use.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from jaxalign import validation
from jaxalign.validation import Rule


def flag_type(
    parse: Callable[[str], Any], rule: Rule, name: str, allowed: str | None = None
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses the text with ``parse`` and checks it with ``rule``;
    ``allowed`` replaces the rule's wording where the flag's text reads differently."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
            ok = rule.accepts(value)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {allowed or rule.allowed}, got {text!r}")
        return value

    convert.__name__ = name  # what argparse calls the type in its own messages
    convert.rule = rule  # how the tests tell a checked numeric flag from a bare int or float
    return convert


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


positive_int = flag_type(int, validation.POSITIVE_INT, "positive_int")
non_negative_int = flag_type(int, validation.NON_NEGATIVE_INT, "non_negative_int")
seed = flag_type(int, validation.SEED, "seed")
positive_number = flag_type(float, validation.POSITIVE, "positive_number")
fraction = flag_type(float, validation.number(0, 1), "fraction")  # [0, 1]
# (0, 1]: a probability mass such as top-p, where 0 would keep nothing.
positive_fraction = flag_type(float, validation.number(0, 1, low_open=True), "positive_fraction")
# (0, 1): a share that must leave something on both sides, such as a seed split.
open_fraction = flag_type(
    float, validation.number(0, 1, low_open=True, high_open=True), "open_fraction"
)
positive_int_list = flag_type(
    _int_list,
    validation.list_of(validation.POSITIVE_INT, non_empty=True),
    "positive_int_list",
    "comma-separated integers >= 1",
)
