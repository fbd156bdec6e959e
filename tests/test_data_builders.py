"""TFDS array_record builders (no TensorFlow), SPA splits, resumable sharded iteration, CLI."""

import argparse
import io
import json
import pathlib

import numpy as np
import pytest

from jaxalign.data.iteration import EpochIterator, epoch_order, shard_indices
from jaxalign.data.records import DataError, read_preference_records, read_records
from jaxalign.data.splits import normalise_prompt, split_seed_and_rounds

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


# -- TFDS builders ----------------------------------------------------------------------------


def test_tensorflow_is_not_needed():
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is None  # the builders below ran without it


def test_demo_data_through_the_builder(tmp_path):
    from jaxalign.data.builders import build_dataset, load_split

    result = build_dataset({"train": "demo"}, "pairs", tmp_path, name="demo")
    expected, report = read_preference_records("demo")
    assert result.reports["train"].to_dict() == report.to_dict()
    train = load_split(result.builder, "train")
    assert len(train) == len(expected)
    assert [train[i] for i in range(len(train))] == expected  # file order, every field kept
    assert train[-1] == expected[-1]
    with pytest.raises(IndexError):
        train[len(train)]
    again = build_dataset({"train": "demo"}, "pairs", tmp_path, name="demo")
    assert again.data_dir == result.data_dir and again.reports == result.reports


def test_builder_splits_layouts_and_skips(tmp_path):
    from jaxalign.data.builders import build_dataset, load_split

    bad = tmp_path / "hh_bad.jsonl"
    bad.write_text((FIXTURES / "hh.jsonl").read_text() + "{oops\n")
    result = build_dataset(
        {"train": str(bad), "test": str(FIXTURES / "hh.jsonl")},
        "hh",
        tmp_path / "tfds",
        name="hh",
        on_bad_record="skip",
    )
    assert (result.reports["train"].read, result.reports["train"].kept) == (5, 4)
    assert result.reports["train"].reasons == {"bad_json": 1}
    train, test = load_split(result.builder, "train"), load_split(result.builder, "test")
    expected, _ = read_records(FIXTURES / "hh.jsonl", "hh")
    assert [r["prompt"] for r in test] == [r["prompt"] for r in expected]
    assert train.take([1])[0]["chosen"] == "I know one: a pun."
    with pytest.raises(DataError, match="not built"):
        load_split(result.builder, "validation")
    with pytest.raises(DataError, match=r"hh_bad.jsonl:5: field '<line>'"):
        build_dataset({"train": str(bad)}, "hh", tmp_path / "tfds", name="hh")


def test_prompt_builder(tmp_path):
    from jaxalign.data.builders import build_dataset, load_split

    result = build_dataset({"train": str(FIXTURES / "prompts.jsonl")}, "prompts", tmp_path)
    records = list(load_split(result.builder))
    assert records[0] == {"id": "q1", "prompt": "Name a color.", "answer": ["red", "blue"]}
    assert "chosen" not in records[1] and records[1]["prompt"][1]["content"] == "Name a fruit."


# -- SPA splits ---------------------------------------------------------------------------------


def _pairs(n, duplicates=()):
    pairs = [
        {"id": f"p{i}", "prompt": f"Question {i}?", "chosen": "a", "rejected": "b"}
        for i in range(n)
    ]
    for i in duplicates:  # same prompt up to case and spacing
        pairs.append(
            {"id": f"dup{i}", "prompt": f"  question   {i}? ", "chosen": "c", "rejected": "d"}
        )
    return pairs


def test_split_is_disjoint_sized_and_reproducible():
    pairs = _pairs(1000, duplicates=range(0, 100, 10))
    split = split_seed_and_rounds(pairs, 0.033, [80, 200, 300], seed=3)
    assert split.duplicates == 10
    assert len(split.seed_pairs) == 33  # round(0.033 * 1000)
    assert [len(r) for r in split.rounds] == [80, 200, 300]
    assert split.unused == 1000 - 33 - 580
    sets = [{normalise_prompt(p["prompt"]) for p in split.seed_pairs}] + [
        {normalise_prompt(p["prompt"]) for p in r} for r in split.rounds
    ]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 613
    assert all("chosen" not in p and "id" in p for r in split.rounds for p in r)
    again = split_seed_and_rounds(pairs, 0.033, [80, 200, 300], seed=3)
    assert again.seed_pairs == split.seed_pairs and again.rounds == split.rounds
    other = split_seed_and_rounds(pairs, 0.033, [80, 200, 300], seed=4)
    assert other.seed_pairs != split.seed_pairs


def test_split_errors():
    with pytest.raises(DataError, match="unique prompts left"):
        split_seed_and_rounds(_pairs(100), 0.1, [50, 50])
    with pytest.raises(DataError, match="seed_fraction"):
        split_seed_and_rounds(_pairs(100), 1.5, [10])


def test_split_cli(tmp_path):
    from jaxalign.cli import data as cli

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in _pairs(200)))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "split",
            "--pairs",
            str(src),
            "--seed-fraction",
            "0.05",
            "--rounds",
            "40,60",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    out = io.StringIO()
    assert cli.split(args, out) == 0
    summary = json.loads((tmp_path / "out" / "split.json").read_text())
    assert summary["counts"] == {
        "seed_pairs": 10,
        "rounds": [40, 60],
        "duplicates": 0,
        "unused": 90,
    }
    seed, _ = read_preference_records(str(tmp_path / "out" / "seed_pairs.jsonl"))
    r2 = [
        json.loads(x) for x in (tmp_path / "out" / "round_2_prompts.jsonl").read_text().splitlines()
    ]
    assert len(seed) == 10 and len(r2) == 60
    assert not {p["prompt"] for p in seed} & {p["prompt"] for p in r2}


# -- resumable, sharded iteration -------------------------------------------------------------


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=1))
    assert epoch_order(5, 0, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_resume_mid_epoch_yields_the_same_remaining_order():
    reference = EpochIterator(37, seed=5).take(100)  # crosses two epoch boundaries
    for stop in (0, 1, 20, 37, 50, 99):
        it = EpochIterator(37, seed=5)
        head = it.take(stop)
        state = json.loads(json.dumps(it.state()))  # survives a round trip through a file
        resumed = EpochIterator.from_state(state, num_records=37)
        assert head + resumed.take(100 - stop) == reference
    assert sorted(reference[:37]) == list(range(37))
    assert sorted(reference[37:74]) == list(range(37))
    with pytest.raises(ValueError, match="num_records"):
        EpochIterator.from_state(EpochIterator(37).state(), num_records=38)


@pytest.mark.parametrize("n, hosts", [(37, 4), (40, 4), (5, 3)])
def test_host_shards_are_disjoint_and_cover_everything(n, hosts):
    order = epoch_order(n, seed=2, epoch=0)
    shards = [shard_indices(order, p, hosts).tolist() for p in range(hosts)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == n
    dropped = [shard_indices(order, p, hosts, drop_remainder=True).tolist() for p in range(hosts)]
    assert {len(s) for s in dropped} == {n // hosts}
    assert len({i for s in dropped for i in s}) == n - n % hosts
    # the iterators of all hosts together read each record once per epoch
    its = [EpochIterator(n, seed=2, process_index=p, process_count=hosts) for p in range(hosts)]
    assert sorted(i for p, it in enumerate(its) for i in it.take(len(shards[p]))) == list(range(n))


def test_bad_host_layout():
    with pytest.raises(ValueError, match="process_index"):
        EpochIterator(10, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="nothing to read"):
        EpochIterator(2, process_index=2, process_count=3, drop_remainder=True)


# -- jaxalign data inspect ----------------------------------------------------------------------


def _inspect(argv):
    from jaxalign.cli import data as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = io.StringIO()
    assert cli.inspect(parser.parse_args(["inspect", *argv]), out) == 0
    return out.getvalue()


def test_inspect_counts_without_a_tokenizer(tmp_path):
    bad = tmp_path / "hh.jsonl"
    bad.write_text((FIXTURES / "hh.jsonl").read_text() + '{"chosen": "x"}\n')
    text = _inspect([str(bad), "--model", "none"])
    assert "layout: hh" in text
    assert "read 5 = kept 4 + skipped 1 (missing_field: 1)" in text


def test_inspect_token_statistics(tmp_path):
    from jaxalign.loading import EMBEDDED, installed_gguf

    if installed_gguf(EMBEDDED["smollm2-135m-instruct"]) is None:
        pytest.skip("the embedded SmolLM2 GGUF is not installed")
    text = _inspect(
        [str(FIXTURES / "ultrafeedback.jsonl"), "--max-prompt-tokens", "40", "--examples", "1"]
    )
    assert "layout: ultrafeedback" in text and "read 3 = kept 3" in text
    assert "prompt: n=3" in text and "chosen: n=3" in text
    assert "truncated at --max-prompt-tokens 40" in text
    assert "<|im_start|>assistant\n7 is prime.<|im_end|>" in text


def test_data_command_is_registered():
    from jaxalign.cli import COMMANDS

    assert COMMANDS["data"][0] == "jaxalign.cli.data"
