"""Validation of preference/prompt JSONL: every record accounted for."""

import json
import random

import pytest

from jaxalign.data.records import (
    DataError,
    read_preference_records,
    read_prompt_records,
)


def _write(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    return str(path)


GOOD = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n"


@pytest.mark.parametrize(
    "line, field",
    [
        ("{not json\n", "<line>"),
        (b"\xff\xfe{}\n", "<line>"),
        ('{"chosen": "a", "rejected": "b"}\n', "prompt"),
        ('{"prompt": 3, "chosen": "a", "rejected": "b"}\n', "prompt"),
        ('{"prompt": "  ", "chosen": "a", "rejected": "b"}\n', "prompt"),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}\n', "rejected"),
        ('{"prompt": "q", "chosen": ["x"], "rejected": "b"}\n', "chosen[0]"),
        ("[1, 2]\n", "<line>"),
    ],
)
def test_bad_record_errors_name_file_line_and_field(tmp_path, line, field):
    path = _write(tmp_path / "pairs.jsonl", [GOOD, line])
    with pytest.raises(DataError) as e:
        read_preference_records(path)
    assert f"pairs.jsonl:2: field {field!r}" in str(e.value)


def test_fuzzed_records_are_all_accounted_for(tmp_path):
    rng = random.Random(0)
    lines, n_good = [], 0
    for i in range(400):
        rec = {"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(json.dumps(rec)[: rng.randrange(1, 10)] + "\n")
        elif kind == 1:
            del rec[rng.choice(["prompt", "chosen", "rejected"])]
            lines.append(json.dumps(rec) + "\n")
        elif kind == 2:
            rec["rejected"] = rec["chosen"]
            lines.append(json.dumps(rec) + "\n")
        elif kind == 3:
            lines.append(b"\xc3\x28" + json.dumps(rec).encode() + b"\n")
        else:
            n_good += 1
            lines.append(json.dumps(rec) + "\n")
    path = _write(tmp_path / "fuzz.jsonl", lines)
    records, report = read_preference_records(path, on_bad_record="skip")
    assert report.read == 400 == report.kept + report.skipped
    assert report.kept == n_good == len(records)
    assert sum(report.reasons.values()) == report.skipped
    assert "read 400" in report.summary()


def test_message_lists_and_ids(tmp_path):
    rec = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": "go away",
    }
    path = _write(tmp_path / "m.jsonl", [json.dumps(rec) + "\n"])
    records, _ = read_preference_records(path)
    assert records[0]["chosen"] == "hello" and records[0]["id"] == "m-1"


def test_demo_data_reads_cleanly():
    pairs, rep = read_preference_records("demo")
    prompts, _ = read_prompt_records("demo")
    evals, _ = read_prompt_records("demo", kind="eval")
    assert rep.skipped == 0 and len(pairs) >= 32
    assert all(r["answer"] for r in prompts + evals)
    seen = {p["prompt"] for p in pairs}
    assert not seen & {e["prompt"] for e in evals}


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_prompt_records(str(tmp_path / "nope.jsonl"))
