"""Reading preference and prompt records from JSONL or Parquet, loudly.

Every record goes through its layout's parser (``layouts.py``) and the checks common to
all layouts. A bad one (malformed JSON, non-UTF-8 bytes, a missing or wrongly typed
field, empty text, identical chosen and rejected, a text longer than ``max_chars``)
either stops the read with an error naming the file, line and field
(``on_bad_record="error"``, the default) or is skipped and counted under its reason
(``"skip"``). ``ReadReport`` accounts for every record: ``read = kept + skipped``.

On several hosts each reads only its share (``shard=(p, P)``): record ``i`` of the file
(0-based, blank lines not counted) is host ``p``'s iff ``i % P == p``, the rule of
``iteration.shard_indices`` on an unshuffled order. Other hosts' JSONL lines are not
decoded or parsed (nor their Parquet rows converted to Python), only counted under
``ReadReport.others``; the reports of all hosts add up (``ReadReport.combine``) to the
report of one host reading the whole file.

A prompt is a string or a list of chat messages ``[{"role", "content"}, ...]``;
a response is a string, or a message list whose last message is the assistant's.
The name ``"demo"`` stands for the embedded demo files shipped in the package.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from jaxalign.data.layouts import PAIR_LAYOUTS, RecordError, get_layout

DEMO_DIR = pathlib.Path(__file__).resolve().parent / "demo"
DEMO_FILES = {
    "pairs": DEMO_DIR / "seed_pairs.jsonl",
    "prompts": DEMO_DIR / "prompts.jsonl",
    "eval": DEMO_DIR / "eval_prompts.jsonl",
}
ON_BAD_RECORD = ("error", "skip")
Shard = tuple[int, int]  # (this host's share p, number of shares P)


class DataError(ValueError):
    """A record or file that cannot be used; the message names file, line and field.

    ``position``: the bad record's 0-based number in the file, when one record is to
    blame (hosts reading shares of a file report the earliest, as one host would).
    """

    def __init__(self, message: str, position: int | None = None):
        super().__init__(message)
        self.position = position


@dataclasses.dataclass
class ReadReport:
    """Accounting of one read: ``read = kept + skipped``, skips counted per reason.

    ``others``: records of the file left to other hosts (a sharded read); they were
    counted, not parsed, so ``read + others`` is the number of records in the file.
    """

    path: str
    read: int = 0
    kept: int = 0
    skipped: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    others: int = 0

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        text = f"{self.path}: read {self.read} = kept {self.kept} + skipped {self.skipped} ({why})"
        return text + (f"; {self.others} left to other hosts" if self.others else "")

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "read": self.read,
            "kept": self.kept,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "others": self.others,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReadReport:
        return cls(
            d["path"],
            d["read"],
            d["kept"],
            d["skipped"],
            collections.Counter(d["reasons"]),
            d.get("others", 0),
        )

    @classmethod
    def combine(cls, reports: Sequence[ReadReport]) -> ReadReport:
        """The report of all hosts' shares together: counts and reasons summed.

        For the shares of one file this equals one host's report of the whole file
        (``others`` is 0: nothing is left to a host outside ``reports``).
        """
        total = cls(reports[0].path if reports else "")
        for r in reports:
            total.read += r.read
            total.kept += r.kept
            total.skipped += r.skipped
            total.reasons.update(r.reasons)
        return total


def resolve_path(path: str, kind: str) -> pathlib.Path:
    """``"demo"`` → the packaged demo file of ``kind`` (pairs, prompts, eval); else the path."""
    if str(path) == "demo":
        return DEMO_FILES[kind]
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {p} not found")
    return p


# -- raw records ----------------------------------------------------------------------------


def _check_shard(shard: Shard | None) -> Shard:
    p, count = (0, 1) if shard is None else shard
    if not (isinstance(p, int) and isinstance(count, int) and 0 <= p < count):
        raise ValueError(f"shard must be (p, P) with 0 <= p < P, got {shard!r}")
    return p, count


def _jsonl_records(
    path: pathlib.Path, shard: Shard | None = None
) -> Iterator[tuple[int, str, dict | RecordError | None]]:
    """``(line, location, raw dict or the RecordError of the line)`` per non-blank line.

    With ``shard=(p, P)`` a line that is another host's is yielded as ``(line, location,
    None)``, neither decoded nor parsed.
    """
    p, count = _check_shard(shard)
    position = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            position += 1
            if (position - 1) % count != p:
                yield lineno, where, None
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, where, RecordError("<line>", f"UTF-8 text ({e.reason})", "not_utf8")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, where, RecordError("<line>", f"a JSON object ({e.msg})", "bad_json")
                continue
            if not isinstance(record, dict):
                yield lineno, where, RecordError("<line>", "a JSON object", "bad_json")
                continue
            yield lineno, where, record


def _parquet_records(
    path: pathlib.Path, shard: Shard | None = None
) -> Iterator[tuple[int, str, dict | None]]:
    """``(row, location, row dict)`` per Parquet row (message lists come back as lists of dicts).

    With ``shard=(p, P)`` another host's row is yielded as ``(row, location, None)``: its
    columns are read (Parquet has no cheaper row access) but not converted to Python.
    """
    p, count = _check_shard(shard)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow; install it with `pip install pyarrow`"
        ) from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        # Rows row + 1 .. row + n of the file; ours are those at 0-based positions ≡ p (mod P).
        first = (p - row) % count
        mine = np.arange(first, batch.num_rows, count)
        ours = iter(batch.to_pylist() if count == 1 else batch.take(mine).to_pylist())
        for i in range(batch.num_rows):
            row += 1
            yield row, f"{path}: row {row}", next(ours) if i % count == first else None


def raw_records(
    path: pathlib.Path, shard: Shard | None = None
) -> Iterator[tuple[int, str, dict | RecordError | None]]:
    """Raw records of a ``.jsonl``/``.json`` (one object a line) or ``.parquet`` file.

    ``shard=(p, P)``: only host ``p``'s records are parsed; the others come as ``None``.
    """
    if path.suffix == ".parquet":
        return _parquet_records(path, shard)
    return _jsonl_records(path, shard)


# -- checks common to every layout ----------------------------------------------------------


def _prompt_chars(prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def check_common(record: dict, max_chars: int | None) -> None:
    """Identical chosen/rejected and the ``max_chars`` limit on each text field."""
    if "chosen" in record and record["chosen"].strip() == record["rejected"].strip():
        raise RecordError("rejected", "a response different from 'chosen'", "identical_pair")
    if max_chars is None:
        return
    sizes = {"prompt": _prompt_chars(record["prompt"])}
    for field in ("chosen", "rejected"):
        if field in record:
            sizes[field] = len(record[field])
    for field, size in sizes.items():
        if size > max_chars:
            raise RecordError(field, f"at most {max_chars} characters, got {size}", "too_long")


def _positioned_records(
    path: pathlib.Path,
    layout: str,
    on_bad_record: str,
    max_chars: int | None,
    report: ReadReport,
    shard: Shard | None,
) -> Iterator[tuple[int, dict]]:
    """``(position, canonical record)``: position is the record's 0-based number in the file."""
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    parse = get_layout(layout)
    for position, (number, where, raw) in enumerate(raw_records(path, shard)):
        if raw is None:
            report.others += 1
            continue
        report.read += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            record = parse(raw)
            check_common(record, max_chars)
        except RecordError as e:
            if on_bad_record == "error":
                raise DataError(
                    f"{where}: field {e.field!r}: expected {e.expected}. "
                    "Fix the record, or set data.on_bad_record=skip to skip and count it.",
                    position,
                ) from None
            report.skipped += 1
            report.reasons[e.reason] += 1
            continue
        record.setdefault("id", f"{path.stem}-{number}")
        report.kept += 1
        yield position, record


def iter_records(
    path: str | pathlib.Path,
    layout: str = "pairs",
    on_bad_record: str = "error",
    max_chars: int | None = None,
    report: ReadReport | None = None,
    shard: Shard | None = None,
) -> Iterator[dict]:
    """Canonical records of one file under ``layout``, updating ``report`` as it goes.

    Records without an ``id`` get ``"<file stem>-<line or row>"`` (the same on every
    host). ``shard=(p, P)``: only host ``p``'s share (see the module docstring).
    """
    path = pathlib.Path(path)
    report = ReadReport(str(path)) if report is None else report
    for _, record in _positioned_records(path, layout, on_bad_record, max_chars, report, shard):
        yield record


def read_records(
    path: str | pathlib.Path,
    layout: str = "pairs",
    on_bad_record: str = "error",
    max_chars: int | None = None,
) -> tuple[list[dict], ReadReport]:
    """All canonical records of ``path`` (``"demo"``: the demo pairs or prompts) and the report."""
    records, _, report = read_record_share(path, layout, on_bad_record, max_chars)
    return records, report


def read_record_share(
    path: str | pathlib.Path,
    layout: str = "pairs",
    on_bad_record: str = "error",
    max_chars: int | None = None,
    shard: Shard | None = None,
) -> tuple[list[dict], np.ndarray, ReadReport]:
    """This host's share of ``path``: its kept records, their positions and the report.

    ``positions [n] int64``: each kept record's 0-based number among the file's records
    (blank lines not counted), which is how hosts agree on a record's global index
    (:func:`kept_record_index`). ``shard=None`` reads the whole file.
    """
    kind = "pairs" if layout in PAIR_LAYOUTS else "prompts"
    path = resolve_path(str(path), kind)
    report = ReadReport(str(path))
    records, positions = [], []
    for position, record in _positioned_records(
        path, layout, on_bad_record, max_chars, report, shard
    ):
        records.append(record)
        positions.append(position)
    return records, np.asarray(positions, np.int64), report


def kept_record_index(kept_shares: Sequence[np.ndarray], total: int) -> np.ndarray:
    """``[total] int64``: each record's index among the file's kept records (-1: skipped).

    ``kept_shares[q]`` is host ``q``'s kept mask over its positions ``q, q + P, ...``
    (any trailing padding is ignored). The index is the record's place in the list one
    host reading the whole file would return, so every host names a record the same way.
    """
    count = len(kept_shares)
    kept = np.zeros(total, bool)
    for q, share in enumerate(kept_shares):
        n = len(range(q, total, count))
        kept[q::count] = np.asarray(share, bool)[:n]
    return np.where(kept, np.cumsum(kept) - 1, -1)


def read_preference_records(
    path: str, on_bad_record: str = "error", layout: str = "pairs", max_chars: int | None = None
) -> tuple[list[dict], ReadReport]:
    """Reads ``{prompt, chosen, rejected}`` records (other fields are kept as they are)."""
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"layout {layout!r} has no preference pairs; use one of {PAIR_LAYOUTS}")
    return read_records(resolve_path(path, "pairs"), layout, on_bad_record, max_chars)


def read_prompt_records(
    path: str, on_bad_record: str = "error", kind: str = "prompts", max_chars: int | None = None
) -> tuple[list[dict], ReadReport]:
    """Reads ``{prompt}`` records (e.g. with ``id`` and ``answer``, kept as they are)."""
    return read_records(resolve_path(path, kind), "prompts", on_bad_record, max_chars)


def write_jsonl(path: str | pathlib.Path, records: list[dict]) -> pathlib.Path:
    """Writes ``records`` one JSON object a line, atomically (temp file + rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
