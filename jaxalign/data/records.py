"""Reading preference and prompt records from JSONL, loudly.

Every record is validated. A bad one (malformed JSON, non-UTF-8 bytes, a missing
or wrongly typed field, empty text, identical chosen and rejected) either stops
the read with an error naming the file, line and field (``on_bad_record="error"``,
the default) or is skipped and counted (``"skip"``). ``ReadReport`` accounts for
every line: ``read = kept + skipped``.

A prompt is a string or a list of chat messages ``[{"role", "content"}, ...]``;
a response is a string, or a message list whose last message is the assistant's.
The name ``"demo"`` stands for the embedded demo files shipped in the package.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib

DEMO_DIR = pathlib.Path(__file__).resolve().parent / "demo"
DEMO_FILES = {
    "pairs": DEMO_DIR / "seed_pairs.jsonl",
    "prompts": DEMO_DIR / "prompts.jsonl",
    "eval": DEMO_DIR / "eval_prompts.jsonl",
}


class DataError(ValueError):
    """A record that cannot be used; the message names file, line and field."""


@dataclasses.dataclass
class ReadReport:
    path: str
    read: int = 0
    kept: int = 0
    skipped: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return f"{self.path}: read {self.read} = kept {self.kept} + skipped {self.skipped} ({why})"


def resolve_path(path: str, kind: str) -> pathlib.Path:
    """``"demo"`` → the packaged demo file of ``kind`` (pairs, prompts, eval); else the path."""
    if path == "demo":
        return DEMO_FILES[kind]
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {p} not found")
    return p


def _check_messages(value, field: str) -> None:
    if not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise _FieldError(field, "a list of {role, content} messages with string values")


class _FieldError(Exception):
    def __init__(self, field: str, expected: str, reason: str = "bad_field"):
        super().__init__(field, expected)
        self.field, self.expected, self.reason = field, expected, reason


def _prompt(record: dict, field: str = "prompt"):
    if field not in record:
        raise _FieldError(field, "a prompt string or message list", "missing_field")
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            raise _FieldError(field, "non-empty text", "empty_text")
        return value
    if isinstance(value, list):
        _check_messages(value, field)
        return value
    raise _FieldError(field, f"a string or a message list, got {type(value).__name__}")


def _response(record: dict, field: str) -> str:
    if field not in record:
        raise _FieldError(field, "a response string", "missing_field")
    value = record[field]
    if isinstance(value, list):
        _check_messages(value, field)
        if value[-1]["role"] != "assistant":
            raise _FieldError(field, "a message list ending with the assistant's message")
        value = value[-1]["content"]
    if not isinstance(value, str):
        raise _FieldError(field, f"a string, got {type(value).__name__}")
    if not value.strip():
        raise _FieldError(field, "non-empty text", "empty_text")
    return value


def _read(path: pathlib.Path, parse, on_bad_record: str) -> tuple[list[dict], ReadReport]:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    report = ReadReport(str(path))
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            report.read += 1
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _FieldError("<line>", f"UTF-8 text ({e.reason})", "not_utf8") from None
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise _FieldError("<line>", f"a JSON object ({e.msg})", "bad_json") from None
                if not isinstance(record, dict):
                    raise _FieldError("<line>", "a JSON object", "bad_json")
                record = parse(record)
                record.setdefault("id", f"{path.stem}-{lineno}")
            except _FieldError as e:
                if on_bad_record == "error":
                    raise DataError(
                        f"{path}:{lineno}: field {e.field!r}: expected {e.expected}. "
                        "Fix the record, or set data.on_bad_record=skip to skip and count it."
                    ) from None
                report.skipped += 1
                report.reasons[e.reason] += 1
                continue
            report.kept += 1
            records.append(record)
    return records, report


def read_preference_records(
    path: str, on_bad_record: str = "error"
) -> tuple[list[dict], ReadReport]:
    """Reads ``{prompt, chosen, rejected}`` records (other fields are kept as they are)."""

    def parse(record: dict) -> dict:
        out = dict(record)
        out["prompt"] = _prompt(record)
        out["chosen"] = _response(record, "chosen")
        out["rejected"] = _response(record, "rejected")
        if out["chosen"].strip() == out["rejected"].strip():
            raise _FieldError("rejected", "a response different from 'chosen'", "identical_pair")
        return out

    return _read(resolve_path(path, "pairs"), parse, on_bad_record)


def read_prompt_records(
    path: str, on_bad_record: str = "error", kind: str = "prompts"
) -> tuple[list[dict], ReadReport]:
    """Reads ``{prompt}`` records (e.g. with ``id`` and ``answer``, kept as they are)."""

    def parse(record: dict) -> dict:
        out = dict(record)
        out["prompt"] = _prompt(record)
        return out

    return _read(resolve_path(path, kind), parse, on_bad_record)
