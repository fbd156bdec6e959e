"""Every numeric flag of every command: a bad value stops the command with exit status 2
and a message naming the flag, before anything is read, loaded or written.

The flags are found by walking each command's argparse actions, so a numeric flag added
later without a validator from :mod:`jaxalign.cli.flags`, or without bad values here,
fails ``test_every_numeric_flag_is_checked``.
"""

from __future__ import annotations

import argparse
import importlib

import pytest

from jaxalign import cli
from jaxalign.cli import flags

POSITIVE_INT = ["0", "-1", "1.5", "x", ""]
NON_NEGATIVE_INT = ["-1", "1.5", "x", ""]
SEED = ["-1", "4294967296", "1.5", "x"]
POSITIVE_NUMBER = ["0", "-1", "nan", "inf", "x"]
FRACTION = ["-0.1", "1.5", "nan", "x"]  # [0, 1]
POSITIVE_FRACTION = ["0", "-0.1", "1.5", "nan", "x"]  # (0, 1]
OPEN_FRACTION = ["0", "1", "2", "-0.5", "nan", "x"]  # (0, 1)
POSITIVE_INT_LIST = ["0", "8000,-1", "8000,x", "1.5", "", "8000,,2"]

BAD_VALUES = {
    ("generate", "--n"): POSITIVE_INT,
    ("generate", "--temperature"): POSITIVE_NUMBER,
    ("generate", "--top-p"): POSITIVE_FRACTION,
    ("generate", "--top-k"): NON_NEGATIVE_INT,
    ("generate", "--min-p"): FRACTION,
    ("generate", "--max-new-tokens"): POSITIVE_INT,
    ("generate", "--seed"): SEED,
    ("generate", "--batch-size"): POSITIVE_INT,
    ("eval", "--max-new-tokens"): POSITIVE_INT,
    ("eval", "--temperature"): POSITIVE_NUMBER,
    ("eval", "--max-prompts"): POSITIVE_INT,
    ("eval", "--kl-samples"): NON_NEGATIVE_INT,  # 0 skips the KL estimate
    ("eval", "--batch-size"): POSITIVE_INT,
    ("eval", "--seed"): SEED,
    ("dpo", "--save-every"): NON_NEGATIVE_INT,  # 0: a checkpoint at the end only
    ("export", "--round"): NON_NEGATIVE_INT,  # round 0 is SPA's seed round
    ("data", "inspect", "--max-prompt-tokens"): POSITIVE_INT,
    ("data", "inspect", "--max-response-tokens"): POSITIVE_INT,
    ("data", "inspect", "--max-chars"): POSITIVE_INT,
    ("data", "inspect", "--bins"): POSITIVE_INT,
    ("data", "inspect", "--examples"): NON_NEGATIVE_INT,
    ("data", "inspect", "--limit"): POSITIVE_INT,
    ("data", "split", "--seed-fraction"): OPEN_FRACTION,
    ("data", "split", "--rounds"): POSITIVE_INT_LIST,
    ("data", "split", "--seed"): SEED,
    ("data", "build", "--max-chars"): POSITIVE_INT,
}

# The required arguments of each command, every output under the test's folder.
REQUIRED = {
    ("generate",): ["--prompts", "prompts.jsonl", "--out", "out/samples.jsonl"],
    ("eval",): ["--model", "m", "--baseline", "b", "--prompts", "demo", "--out", "out"],
    ("dpo",): ["--pairs", "demo", "--output-dir", "out"],
    ("export",): ["run", "--out", "out/exported"],
    ("data", "inspect"): ["demo"],
    ("data", "split"): ["--pairs", "demo", "--out", "out"],
    ("data", "build"): ["--train", "demo", "--out", "out"],
}


def _parsers():
    """``(command path, parser)`` of every command and ``data`` action."""

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))

    for name, (module, _) in cli.COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"jaxalign {name}")
        importlib.import_module(module).add_arguments(parser)
        yield from walk(parser, (name,))


def _is_numeric(action: argparse.Action) -> bool:
    default = action.default
    numbers = (int, float)
    return (
        action.type in numbers
        or hasattr(action.type, "rule")
        or (type(default) in numbers)
        or (isinstance(default, tuple | list) and any(type(x) in numbers for x in default))
    )


NUMERIC = {
    (*path, action.option_strings[-1]): action
    for path, parser in _parsers()
    for action in parser._actions
    if action.option_strings and _is_numeric(action)
}


def test_every_numeric_flag_is_checked():
    unchecked = sorted(" ".join(k) for k, a in NUMERIC.items() if not hasattr(a.type, "rule"))
    assert not unchecked, f"give these flags a type= from jaxalign.cli.flags: {unchecked}"
    untested = sorted(" ".join(k) for k in set(NUMERIC) - set(BAD_VALUES))
    assert not untested, f"add bad values for {untested} to BAD_VALUES"
    assert set(BAD_VALUES) == set(NUMERIC)


@pytest.mark.parametrize("key", sorted(NUMERIC), ids=" ".join)
def test_defaults_pass_their_own_validator(key):
    action = NUMERIC[key]
    assert action.default is None or action.type.rule.accepts(action.default)


@pytest.mark.parametrize(
    "key, value", [(k, v) for k, values in BAD_VALUES.items() for v in values], ids=str
)
def test_bad_flag_values_stop_with_exit_2_and_write_nothing(
    key, value, tmp_path, monkeypatch, capsys
):
    from jaxalign import loading

    def must_not_run(*args, **kwargs):
        raise AssertionError("a bad flag value reached model loading")

    monkeypatch.setattr(loading, "load", must_not_run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    before = sorted(tmp_path.rglob("*"))
    *path, flag = key
    assert cli.main([*path, *REQUIRED[tuple(path)], flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be " in err and f"got {value!r}" in err, err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "validator, text, value",
    [
        (flags.positive_int, "3", 3),
        (flags.non_negative_int, "0", 0),
        (flags.seed, "4294967295", 2**32 - 1),
        (flags.positive_number, "0.7", 0.7),
        (flags.fraction, "0", 0.0),
        (flags.fraction, "1", 1.0),
        (flags.positive_fraction, "1", 1.0),
        (flags.open_fraction, "0.033", 0.033),
        (flags.positive_int_list, "8000,20000,30000", (8000, 20000, 30000)),
        (flags.positive_int_list, "5", (5,)),
    ],
)
def test_good_values_pass(validator, text, value):
    assert validator(text) == value


def test_export_without_out_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", "m", "--baseline", "b", "--prompts", "demo"]
    assert cli.main([*argv, "--export", "alpaca_eval"]) == 2
    assert "--export needs --out" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
