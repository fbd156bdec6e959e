"""Dataset layouts on small fixture files, validation per layout, Parquet, templated ids."""

import json
import pathlib
import random

import pytest

from jaxalign.data import layouts
from jaxalign.data.layouts import RecordError, detect_layout, split_hh_dialogues
from jaxalign.data.records import DataError, read_preference_records, read_records

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
POST = "I adopted a cat last week and it hides under the bed all day. How do I help it settle in?"
CAT_PROMPT = f"SUBREDDIT: r/cats\nTITLE: New cat hides all day\nPOST: {POST}\nTL;DR:"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def _triples(records):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in records]


def test_ultrafeedback_fixture():
    records, report = read_records(FIXTURES / "ultrafeedback.jsonl", "ultrafeedback")
    assert report.read == report.kept == 3
    assert _triples(records) == [
        ("Name a prime number.", "7 is prime.", "9."),
        ("Capital of France?", "Paris.", "Lyon."),  # prompt from the first user message
        ([user("Hi"), assistant("Hello! How can I help?"), user("Say bye")], "Bye!", "No."),
    ]
    assert records[0]["score_chosen"] == 9.0 and records[1]["prompt_id"] == "p2"
    assert records[2]["id"] == "ultrafeedback-3"


def test_hh_fixture_prefix_splitting():
    records, report = read_records(FIXTURES / "hh.jsonl", "hh")
    assert report.kept == 4
    assert _triples(records) == [
        ([user("What is 2+2?")], "4.", "5."),
        (
            [user("Hi"), assistant("Hello."), user("Tell a joke")],
            "I know one: a pun.",  # the shared "I " stays in both responses
            "I won't.",
        ),
        ([user("Count to three")], "One, two, three.", "One, two"),  # one is a prefix
        ([user("Color of sky?")], "Blue.", "Green."),  # no leading blank line
    ]


@pytest.mark.parametrize(
    "chosen, rejected, field, reason",
    [
        # the dialogues differ before their last turn
        (
            "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
            "\n\nHuman: a\n\nAssistant: z\n\nHuman: b\n\nAssistant: w",
            "chosen",
            "bad_field",
        ),
        # nothing shared up to an Assistant marker
        ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x", "chosen", "bad_field"),
        # empty final turn
        ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: a\n\nAssistant:  ", "rejected", "empty_text"),
        (
            "\n\nHuman: a\n\nAssistant: x",
            "\n\nHuman: a\n\nAssistant: x",
            "rejected",
            "identical_pair",
        ),
        (
            "Hello\n\nHuman: a\n\nAssistant: x",
            "Hello\n\nHuman: a\n\nAssistant: y",
            "chosen",
            "bad_field",
        ),
    ],
)
def test_hh_edge_cases(chosen, rejected, field, reason):
    with pytest.raises(RecordError) as e:
        layouts.parse_hh({"chosen": chosen, "rejected": rejected})
    assert (e.value.field, e.value.reason) == (field, reason)


def test_hh_split_keeps_markers_inside_text():
    prompt, c, r = split_hh_dialogues(
        "\n\nHuman: Say 'Assistant:'\n\nAssistant: Assistant: ok",
        "\n\nHuman: Say 'Assistant:'\n\nAssistant: no",
    )
    assert prompt == [user("Say 'Assistant:'")] and (c, r) == ("Assistant: ok", "no")


def test_tldr_fixtures():
    records, _ = read_records(FIXTURES / "tldr.jsonl", "tldr")
    assert _triples(records) == [
        (CAT_PROMPT, "New cat hides; how to help it settle?", "I have a cat."),
        ("SUBREDDIT: r/cats\nTITLE: x\nPOST: y\nTL;DR:", "a summary", "another summary"),
    ]
    comparisons, _ = read_records(FIXTURES / "tldr_comparisons.jsonl", "tldr")
    assert _triples(comparisons) == [
        (CAT_PROMPT, "New cat hides; how to help it settle?", "I have a cat."),  # choice 1
        (
            "SUBREDDIT: r/programming\nTITLE: Odd bug\n"
            "POST: My code fails on Mondays only.\nTL;DR:",
            "Bug on Mondays.",
            "Code.",
        ),
    ]
    assert comparisons[0]["id"] == "t3_abc" and comparisons[0]["worker"] == "w1"
    assert "info" not in comparisons[0] and "summaries" not in comparisons[0]


@pytest.mark.parametrize(
    "record, field",
    [
        (
            {"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2},
            "choice",
        ),
        ({"info": {"post": "p"}, "summaries": [{"text": "a"}], "choice": 0}, "summaries"),
        (
            {"info": {"title": "t"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0},
            "info.post",
        ),
        (
            {"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": " "}], "choice": 0},
            "summaries[1].text",
        ),
        ({"title": "t", "chosen": "a", "rejected": "b"}, "post"),
    ],
)
def test_tldr_errors_name_the_field(record, field):
    with pytest.raises(RecordError) as e:
        layouts.parse_tldr(record)
    assert e.value.field == field


def test_ultrafeedback_errors():
    ok = [user("q"), assistant("a")]
    with pytest.raises(RecordError, match="rejected"):
        layouts.parse_ultrafeedback({"chosen": ok, "rejected": [user("other"), assistant("b")]})
    with pytest.raises(RecordError) as e:
        layouts.parse_ultrafeedback({"chosen": [user("q"), user("a")], "rejected": ok})
    assert e.value.field == "chosen"
    with pytest.raises(RecordError) as e:
        layouts.parse_ultrafeedback({"chosen": [assistant("a")], "rejected": [assistant("b")]})
    assert e.value.field == "prompt"


def test_prompts_fixture():
    records, _ = read_records(FIXTURES / "prompts.jsonl", "prompts")
    assert records[0] == {"id": "q1", "prompt": "Name a color.", "answer": ["red", "blue"]}
    assert records[1]["prompt"][0]["role"] == "system" and records[1]["id"] == "prompts-2"


@pytest.mark.parametrize(
    "name, layout",
    [
        ("ultrafeedback", "ultrafeedback"),
        ("hh", "hh"),
        ("tldr", "tldr"),
        ("tldr_comparisons", "tldr"),
        ("prompts", "prompts"),
    ],
)
def test_detect_layout(name, layout):
    first = json.loads((FIXTURES / f"{name}.jsonl").read_text().splitlines()[0])
    assert detect_layout(first) == layout


def test_unknown_layout():
    with pytest.raises(ValueError, match="known layouts"):
        read_records(FIXTURES / "hh.jsonl", "anthropic")


def test_max_chars_names_the_field(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "x" * 50, "rejected": "y"}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:1: field 'chosen': expected at most 40"):
        read_preference_records(str(path), max_chars=40)
    records, report = read_preference_records(str(path), "skip", max_chars=40)
    assert not records and report.reasons == {"too_long": 1}
    assert len(read_preference_records(str(path), max_chars=50)[0]) == 1


def test_parquet_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()
    ]
    for row in rows:  # Parquet needs one schema: every row gets every column
        row.setdefault("prompt", None)
        row.setdefault("prompt_id", None)
        row.setdefault("score_chosen", None)
        row.setdefault("score_rejected", None)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    from_parquet, report = read_records(tmp_path / "uf.parquet", "ultrafeedback")
    from_jsonl, _ = read_records(FIXTURES / "ultrafeedback.jsonl", "ultrafeedback")
    assert report.kept == 3
    assert _triples(from_parquet) == _triples(from_jsonl)
    # errors name the row
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "a"}]),
        tmp_path / "b.parquet",
    )
    with pytest.raises(DataError, match=r"b.parquet: row 1: field 'rejected'"):
        read_records(tmp_path / "b.parquet", "pairs")


# -- fuzz: every record of every layout is accounted for ------------------------------------


def _good(layout, i):
    if layout == "ultrafeedback":
        return {
            "chosen": [user(f"q{i}"), assistant(f"c{i}")],
            "rejected": [user(f"q{i}"), assistant(f"r{i}")],
        }
    if layout == "hh":
        return {
            "chosen": f"\n\nHuman: q{i}\n\nAssistant: c{i}",
            "rejected": f"\n\nHuman: q{i}\n\nAssistant: r{i}",
        }
    if layout == "tldr":
        return {
            "info": {"post": f"p{i}", "title": "t", "subreddit": "s"},
            "summaries": [{"text": f"a{i}"}, {"text": f"b{i}"}],
            "choice": i % 2,
        }
    return {"prompt": f"q{i}"}


def _corrupt(layout, record, rng):
    """A corrupted copy of ``record`` (always invalid) and the reason it must be counted under."""
    kind = rng.randrange(5)
    if kind == 0:
        return json.dumps(record)[: rng.randrange(1, 10)].encode(), "bad_json"
    if kind == 1:
        return b"\xc3\x28" + json.dumps(record).encode(), "not_utf8"
    if kind == 2:
        key = rng.choice(sorted(record))
        return json.dumps({k: v for k, v in record.items() if k != key}).encode(), "missing_field"
    if kind == 3:
        key = rng.choice(sorted(record))
        return json.dumps({**record, key: 17}).encode(), "bad_field"
    bad = dict(record)
    if layout == "ultrafeedback":
        bad["rejected"] = bad["chosen"]
    elif layout == "hh":
        bad["rejected"] = bad["chosen"]
    elif layout == "tldr":
        bad["summaries"] = [bad["summaries"][0]] * 2
    else:
        bad["prompt"] = "  "
        return json.dumps(bad).encode(), "empty_text"
    return json.dumps(bad).encode(), "identical_pair"


@pytest.mark.parametrize("layout", ["ultrafeedback", "hh", "tldr", "prompts"])
def test_fuzzed_records_are_all_accounted_for(tmp_path, layout):
    rng = random.Random(layout)
    lines, expected = [], {}
    n_good = 0
    for i in range(300):
        record = _good(layout, i)
        if rng.random() < 0.5:
            n_good += 1
            lines.append(json.dumps(record).encode())
        else:
            line, reason = _corrupt(layout, record, rng)
            lines.append(line)
            expected[reason] = expected.get(reason, 0) + 1
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, report = read_records(path, layout, on_bad_record="skip")
    assert report.read == 300 == report.kept + report.skipped
    assert report.kept == n_good == len(records)
    assert sum(report.reasons.values()) == report.skipped
    assert dict(report.reasons) == expected
    with pytest.raises(DataError, match=r"fuzz.jsonl:\d+: field "):
        read_records(path, layout)


# -- templated ids equal transformers' apply_chat_template ----------------------------------


@pytest.fixture(scope="module")
def tokenizers():
    from jaxalign.loading import EMBEDDED, installed_gguf
    from jaxalign.tokenizer import Tokenizer

    path = installed_gguf(EMBEDDED["smollm2-135m-instruct"])
    if path is None:
        pytest.skip("the embedded SmolLM2 GGUF is not installed")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_gguf(path), reference


def _ids(encoding):
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


@pytest.mark.parametrize(
    "name, layout",
    [("ultrafeedback", "ultrafeedback"), ("hh", "hh"), ("tldr_comparisons", "tldr")],
)
def test_templated_ids_match_transformers(tokenizers, name, layout):
    from jaxalign.data import stats

    ours, reference = tokenizers
    records, _ = read_records(FIXTURES / f"{name}.jsonl", layout)
    for record in records:
        messages = stats.prompt_messages(record["prompt"])
        expected_prompt = reference.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        assert ours.encode_prompt(record["prompt"]) == _ids(expected_prompt)
        for side in ("chosen", "rejected"):
            full = [*messages, {"role": "assistant", "content": record[side]}]
            expected = reference.apply_chat_template(
                full, add_generation_prompt=False, tokenize=True
            )
            assert stats.encode_conversation(record, ours, side) == _ids(expected)
