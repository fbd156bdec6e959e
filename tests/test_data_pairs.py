"""Pair-batch building: layout, masks, truncation counts, buckets and padding, by hand."""

import dataclasses
import random
from collections import Counter

import numpy as np
import pytest

from jaxalign.data.pairs import (
    PairReport,
    bucket_length,
    bucket_pairs,
    build_pair_batches,
    pack_pair_batches,
    plan_pair_batches,
)
from jaxalign.training import PAIR_FIELDS


class CharTokenizer:
    """One id per character (ord), prompt gets BOS=1, responses end with EOS=2."""

    pad_token_id = 0

    def encode_prompt(self, prompt, use_chat_template=True):
        return [1] + [ord(c) for c in prompt]

    def encode_response(self, text, add_eos=True):
        return [ord(c) for c in text] + ([2] if add_eos else [])


def test_layout_masks_and_padding_pairs():
    records = [
        {"prompt": "ab", "chosen": "xyz", "rejected": "q", "weight": 0.5, "smoothing": 0.1},
        {"prompt": "c", "chosen": "uv", "rejected": "w", "p": 0.7, "rejected_eos": False},
    ]
    batches, report = build_pair_batches(
        records, CharTokenizer(), batch_size=4, max_prompt_tokens=8, max_response_tokens=8
    )
    assert len(batches) == 1 and report.kept == 2 and report.padding_pairs == 2
    b = batches[0]
    assert set(PAIR_FIELDS) <= set(b)
    assert b["chosen_ids"].shape == (4, 16) and b["chosen_ids"].dtype == np.int32
    # Record 0, chosen: [BOS a b | x y z EOS], right-padded from column 0.
    np.testing.assert_array_equal(b["chosen_ids"][0, :7], [1, 97, 98, 120, 121, 122, 2])
    np.testing.assert_array_equal(b["chosen_attention_mask"][0], [1] * 7 + [0] * 9)
    np.testing.assert_array_equal(b["chosen_loss_mask"][0], [0] * 3 + [1] * 4 + [0] * 9)
    # Record 1, rejected without EOS: [BOS c | w].
    np.testing.assert_array_equal(b["rejected_ids"][1, :3], [1, 99, 119])
    np.testing.assert_array_equal(b["rejected_loss_mask"][1, :4], [0, 0, 1, 0])
    np.testing.assert_allclose(b["weight"], [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(b["smoothing"], [0.1, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(b["p"], [1.0, 0.7, 1.0, 1.0])
    np.testing.assert_array_equal(b["index"], [0, 1, -1, -1])
    assert b["chosen_attention_mask"][2:].sum() == 0


def test_truncation_is_counted_and_keeps_prompt_end():
    records = [{"prompt": "abcdefghij", "chosen": "klmnopqrstuvwxyz", "rejected": "k"}]
    batches, report = build_pair_batches(
        records, CharTokenizer(), batch_size=1, max_prompt_tokens=4, max_response_tokens=5
    )
    assert report.truncated_prompts == 1 and report.truncated_responses == 1
    b = batches[0]
    assert b["chosen_ids"].shape[1] == 9  # the bucket is capped at 4 + 5
    np.testing.assert_array_equal(b["chosen_ids"][0], [ord(c) for c in "ghijklmno"])
    np.testing.assert_array_equal(b["chosen_loss_mask"][0], [0] * 4 + [1] * 5)
    assert "truncated prompts 1" in report.summary()


def test_buckets_group_by_length():
    records = [{"prompt": "a" * n, "chosen": "b", "rejected": "c"} for n in (3, 20, 4, 40, 5)]
    batches, report = build_pair_batches(
        records, CharTokenizer(), batch_size=2, max_prompt_tokens=64, max_response_tokens=8
    )
    assert report.buckets == {16: 3, 24: 1, 48: 1}
    # Apart: 16, 16, 24, 48 (104 padded positions a row). Packing 24's pair with 48's saves
    # 24 (the most); then 16's two batches joining them would cost 64 more: 16, 16, 48.
    assert [b["chosen_ids"].shape for b in batches] == [(2, 16), (2, 16), (2, 48)]
    assert [list(b["index"]) for b in batches] == [[0, 2], [4, -1], [1, 3]]
    assert report.padding_pairs == 1
    unmerged = plan_pair_batches([report.buckets], 2, merge=False)
    assert unmerged == [16, 16, 24, 48]


def test_empty_response_is_skipped_and_counted():
    class Empty(CharTokenizer):
        def encode_response(self, text, add_eos=True):
            return [] if text == "-" else super().encode_response(text, add_eos)

    records = [
        {"prompt": "a", "chosen": "-", "rejected": "b"},
        {"prompt": "a", "chosen": "c", "rejected": "b"},
    ]
    _, report = build_pair_batches(
        records, Empty(), batch_size=1, max_prompt_tokens=4, max_response_tokens=4
    )
    assert (report.read, report.kept, report.skipped) == (2, 1, 1)
    assert report.reasons["empty_response"] == 1


@pytest.mark.parametrize(
    "n, want", [(1, 16), (16, 16), (17, 24), (25, 32), (33, 48), (100, 128), (129, 192), (700, 600)]
)
def test_bucket_length(n, want):
    assert bucket_length(n, 600) == want


# -- one plan for several hosts, each with its own share of the records -------------------------


def _random_records(n, seed=0):
    rng = random.Random(seed)
    return [
        {
            "prompt": "a" * rng.randrange(1, 70),
            "chosen": "b" * rng.randrange(1, 30),
            "rejected": "c" * rng.randrange(1, 30),
            "weight": round(rng.uniform(0.5, 2), 3),
        }
        for _ in range(n)
    ]


LIMITS = {"max_prompt_tokens": 40, "max_response_tokens": 20}


def _host_batches(records, count, batch_size):
    """Each of ``count`` hosts buckets records ``p, p + count, ...`` and packs the agreed plan."""
    rows = batch_size // count
    shares = [
        bucket_pairs(
            records[p::count], CharTokenizer(), indices=range(p, len(records), count), **LIMITS
        )
        for p in range(count)
    ]
    plan = plan_pair_batches([report.buckets for _, report in shares], rows)
    batches = [pack_pair_batches(by_bucket, plan, rows, 0) for by_bucket, _ in shares]
    return plan, batches, [report for _, report in shares]


def test_plan_by_hand():
    counts = [{16: 5, 48: 1}, {16: 2, 24: 3}, {48: 4}]
    assert plan_pair_batches(counts, 2, merge=False) == [16, 16, 16, 24, 24, 48, 48]
    # Merging 24 into 48: the hosts' sums 1, 3, 4 fill 2 batches at 48 (96 positions a row,
    # against 48 + 96); 16 into 24 would save 24, less. Then 16 into 48: 3 batches at 48 (144)
    # against 48 + 96, the same: not merged.
    assert plan_pair_batches(counts, 2) == [16, 16, 16, 48, 48]
    assert plan_pair_batches([{16: 1, 24: 1, 32: 1}], 4) == [32]  # one batch, not three
    assert plan_pair_batches([{16: 8, 24: 8}], 8) == [16, 24]  # full batches stay apart
    assert plan_pair_batches([{16: 4}], 4) == [16]
    assert plan_pair_batches([{}, {}], 4) == []
    with pytest.raises(ValueError, match="room"):
        pack_pair_batches({16: [(0, [1], [2], [3], {})] * 3}, [16], 2, 0)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_hosts_share_one_plan_and_every_record_once(count):
    records = _random_records(203, seed=count)
    batch_size = 12
    whole, single = build_pair_batches(records, CharTokenizer(), batch_size=batch_size, **LIMITS)
    plan, batches, reports = _host_batches(records, count, batch_size)
    rows = batch_size // count
    # Every host runs the same batches: same number, same lengths, same shapes.
    for host in batches:
        assert [b["chosen_ids"].shape for b in host] == [(rows, t) for t in plan]
        assert all(b[k].shape[0] == rows for b in host for k in b)
    # No record lost or duplicated; each row is the row one host would have built.
    expected = {}
    for b in whole:
        for i, index in enumerate(b["index"]):
            if index >= 0:
                expected[int(index)] = {k: v[i] for k, v in b.items()}
    seen = {}
    for p, host in enumerate(batches):
        for b in host:
            for i, index in enumerate(b["index"]):
                if index < 0:
                    assert b["weight"][i] == 0 and b["chosen_attention_mask"][i].sum() == 0
                    continue
                assert index % count == p and int(index) not in seen
                seen[int(index)] = {k: v[i] for k, v in b.items()}
    assert sorted(seen) == sorted(expected) == list(range(len(records)))
    for index, row in expected.items():
        for k, v in row.items():
            got = seen[index][k]
            if v.ndim:  # a token row: the hosts' plan may pack it at another padded length
                n = min(len(got), len(v))
                assert not got[n:].any() and not v[n:].any(), (index, k)  # padding beyond
                got, v = got[:n], v[:n]
            np.testing.assert_array_equal(got, v, err_msg=f"{index} {k}")
    # The reports add up to one host's, padding aside (it is the plan's slack).
    total = PairReport.combine(reports)
    total.padding_pairs = len(plan) * batch_size - total.kept
    got, want = dataclasses.asdict(total), dataclasses.asdict(single)
    if count > 1:  # more hosts, more slack: each pads its own part of a bucket's last batch
        assert got.pop("padding_pairs") >= want.pop("padding_pairs")
    assert got == want and total.kept == len(records)
    assert len(plan) >= len(whole)
    if count == 1:  # one host: exactly today's batches
        assert len(batches[0]) == len(whole)
        for a, b in zip(batches[0], whole, strict=True):
            assert list(a) == list(b)
            for k in a:
                assert a[k].dtype == b[k].dtype
                np.testing.assert_array_equal(a[k], b[k])


def test_pair_report_round_trips_through_json():
    import json

    _, report = build_pair_batches(_random_records(20), CharTokenizer(), batch_size=4, **LIMITS)
    again = PairReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert dataclasses.asdict(again) == dataclasses.asdict(report)


class SamplerTokenizer(CharTokenizer):
    """CharTokenizer with two generation-ending ids, 2 (end of turn) and 3 (EOS)."""

    eos_token_ids = (2, 3)
    end_of_turn_id = 2


@pytest.mark.parametrize(
    "record, want",
    [
        ({"chosen": "ab"}, [97, 98, 2]),  # text, finished by default: encoded with EOS
        ({"chosen": "ab", "chosen_eos": False}, [97, 98]),  # text, cut: no EOS
        ({"chosen": "x", "chosen_ids": [5, 6, 3]}, [5, 6, 3]),  # ids ending with an EOS id
        ({"chosen": "x", "chosen_ids": [5, 6]}, [5, 6, 2]),  # stopped by a stop string
        ({"chosen": "x", "chosen_ids": [], "chosen_eos": True}, [2]),
        ({"chosen": "x", "chosen_ids": [5, 2], "chosen_eos": False}, [5]),  # cut: EOS dropped
        ({"chosen": "x", "chosen_ids": [5, 6, 3], "chosen_eos": False}, [5, 6]),
        ({"chosen": "x", "chosen_ids": [5, 6], "chosen_eos": False}, [5, 6]),
        ({"chosen": "x", "chosen_ids": [], "chosen_eos": False}, []),
        ({"chosen": "x", "chosen_ids": ["7", 8.0]}, [7, 8, 2]),  # ids as JSON gave them
    ],
)
def test_response_ids_end_a_finished_response_and_only_it(record, want):
    from jaxalign.data.pairs import response_ids

    assert response_ids(record, "chosen", SamplerTokenizer()) == want
    # the other side is read from its own fields only
    other = {k.replace("chosen", "rejected"): v for k, v in record.items()}
    assert response_ids({**other, "chosen": "zz"}, "rejected", SamplerTokenizer()) == want


def test_tokenise_keeps_given_prompt_ids_cuts_from_the_left_and_counts_cut_responses():
    from jaxalign.data.pairs import _tokenise

    tok = SamplerTokenizer()
    record = {"prompt_ids": [9, 8, 7, 6, 5], "chosen": "abcd", "rejected": "xy", "prompt": "?"}
    prompt, chosen, rejected, prompt_cut, cuts = _tokenise(record, tok, 3, 3, True)
    assert prompt == [7, 6, 5] and prompt_cut  # the prompt's end survives
    assert chosen == [97, 98, 99] and rejected == [120, 121, 2] and cuts == 1
    prompt, chosen, rejected, prompt_cut, cuts = _tokenise(record, tok, 5, 5, True)
    assert prompt == [9, 8, 7, 6, 5] and not prompt_cut and cuts == 0
    assert chosen == [97, 98, 99, 100, 2]
    # without prompt ids the prompt is encoded (BOS + characters here)
    without_ids = {k: v for k, v in record.items() if k != "prompt_ids"}
    prompt, *_ = _tokenise(without_ids, tok, 9, 9, True)
    assert prompt == [1, 63]

    class Recording(SamplerTokenizer):
        def encode_prompt(self, prompt, use_chat_template=True):
            return [int(use_chat_template)]

    for template in (True, False):
        prompt, *_ = _tokenise(without_ids, Recording(), 9, 9, template)
        assert prompt == [int(template)]
    prompt, _, _, _, cuts = _tokenise(
        {"prompt": "abc", "chosen": "abcd", "rejected": "wxyz"}, tok, 2, 2, True
    )
    assert prompt == [98, 99] and cuts == 2


def test_pad_token_id_falls_back_to_zero():
    from jaxalign.data.pairs import pad_token_id

    class NoPad:
        pass

    class NonePad:
        pad_token_id = None

    class Pad:
        pad_token_id = 5

    assert pad_token_id(NoPad()) == 0 and pad_token_id(NonePad()) == 0
    assert pad_token_id(Pad()) == 5 and isinstance(pad_token_id(Pad()), int)


def test_bucket_pairs_checks_its_limits_and_counts_every_skip():
    class Recording(CharTokenizer):
        templates: list = []

        def encode_prompt(self, prompt, use_chat_template=True):
            self.templates.append(use_chat_template)
            return super().encode_prompt(prompt)

        def encode_response(self, text, add_eos=True):
            return [] if text == "-" else super().encode_response(text, add_eos)

    tok = Recording()
    one = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    for bad in (
        {"max_prompt_tokens": 0, "max_response_tokens": 4},
        {"max_prompt_tokens": 4, "max_response_tokens": 0},
    ):
        with pytest.raises(ValueError, match=r"must be positive"):
            bucket_pairs(one, tok, **bad)
    buckets, report = bucket_pairs(one, tok, max_prompt_tokens=1, max_response_tokens=1)
    assert report.kept == 1 and tok.templates == [True]  # the chat template by default
    with pytest.raises(ValueError, match=r"2 indices for 1 records"):
        bucket_pairs(one, tok, max_prompt_tokens=4, max_response_tokens=4, indices=[0, 1])
    empties = [{"prompt": "a", "chosen": "-", "rejected": "b"}] * 2 + one
    _, report = bucket_pairs(empties, tok, max_prompt_tokens=4, max_response_tokens=4)
    assert (report.read, report.kept, report.skipped) == (3, 1, 2)
    assert report.reasons["empty_response"] == 2
    # the bucket is bucket_length(prompt + longest response, the limits' sum, min_bucket)
    buckets, _ = bucket_pairs(one, tok, max_prompt_tokens=40, max_response_tokens=40, min_bucket=4)
    assert list(buckets) == [bucket_length(2 + 2, 80, 4)] and bucket_length(4, 80, 4) != 16


def test_plan_needs_positive_rows():
    with pytest.raises(ValueError, match=r"rows per host must be positive, got 0"):
        plan_pair_batches([{16: 1}], 0)


def test_every_batch_field_has_the_training_dtype():
    """What the step's shardings and the loss expect: ``int32`` ids, masks and index,
    ``float32`` weight, smoothing and p — the padding rows' too."""
    records = [{"prompt": "ab", "chosen": "xyz", "rejected": "q", "weight": 2, "p": 1}]
    (batch,), _ = build_pair_batches(
        records, CharTokenizer(), batch_size=2, max_prompt_tokens=4, max_response_tokens=4
    )
    for side in ("chosen", "rejected"):
        for field in ("ids", "attention_mask", "loss_mask"):
            assert batch[f"{side}_{field}"].dtype == np.int32, (side, field)
    assert batch["index"].dtype == np.int32
    for field in ("weight", "smoothing", "p"):
        assert batch[field].dtype == np.float32, field


def test_a_padding_row_anywhere_in_a_batch_stays_blank():
    """``_pack`` fills every real row, whatever rows of padding (index -1) come before it."""
    from jaxalign.data.pairs import _pack

    pad = (-1, [], [], [], {})
    real = (4, [1, 97], [98, 2], [99], {"weight": 0.5, "smoothing": 0.2, "p": 0.8})
    batch = _pack([pad, real, pad], 4, pad_id=7)
    np.testing.assert_array_equal(batch["index"], [-1, 4, -1])
    np.testing.assert_allclose(batch["weight"], [0.0, 0.5, 0.0])
    np.testing.assert_allclose(batch["smoothing"], [0.0, 0.2, 0.0])
    np.testing.assert_allclose(batch["p"], [1.0, 0.8, 1.0])
    np.testing.assert_array_equal(batch["chosen_ids"], [[7] * 4, [1, 97, 98, 2], [7] * 4])
    np.testing.assert_array_equal(batch["rejected_ids"][1], [1, 97, 99, 7])
    np.testing.assert_array_equal(batch["rejected_loss_mask"], [[0] * 4, [0, 0, 1, 0], [0] * 4])


def test_build_pair_batches_passes_its_options_on():
    """The chat-template flag (default on), ``min_bucket`` and the tokenizer's pad id reach
    the batches; a bad batch size is named."""

    class Templated(CharTokenizer):
        pad_token_id = 7

        def encode_prompt(self, prompt, use_chat_template=True):
            return [5, 5, *super().encode_prompt(prompt)] if use_chat_template else [1]

    records = [{"prompt": "ab", "chosen": "x", "rejected": "y"}]
    limits = {"max_prompt_tokens": 8, "max_response_tokens": 8}
    (default,), _ = build_pair_batches(records, Templated(), batch_size=2, **limits)
    (plain,), _ = build_pair_batches(
        records, Templated(), batch_size=2, use_chat_template=False, **limits
    )
    np.testing.assert_array_equal(default["chosen_ids"][0, :6], [5, 5, 1, 97, 98, 120])
    np.testing.assert_array_equal(plain["chosen_ids"][0, :3], [1, 120, 2])
    assert (default["chosen_ids"][1] == 7).all()  # the padding row: the tokenizer's pad id
    _, small = build_pair_batches(records, Templated(), batch_size=2, min_bucket=2, **limits)
    _, large = build_pair_batches(records, Templated(), batch_size=2, min_bucket=16, **limits)
    assert list(small.buckets) == [bucket_length(7, 16, 2)] and list(large.buckets) == [16]
    assert bucket_length(7, 16, 2) != 16
    with pytest.raises(ValueError) as e:
        build_pair_batches(records, Templated(), batch_size=0, **limits)
    assert str(e.value) == "batch_size must be positive, got 0"


def test_pack_pair_batches_names_a_plan_that_does_not_fit():
    rows = [(0, [1], [2], [3], {})]
    with pytest.raises(ValueError) as e:
        pack_pair_batches({16: rows, 32: rows}, [16], 1, 0)  # bucket 32 not planned
    assert str(e.value) == (
        "bucket 32 holds 1 pairs but the plan has no batch that long (longest 16); "
        "build the plan from every host's counts"
    )
    with pytest.raises(ValueError) as e:
        pack_pair_batches({16: rows * 3}, [16], 2, 0)
    assert str(e.value) == (
        "3 pairs are packed at length 16 but the plan has room for 2; "
        "build the plan from every host's counts"
    )
    with pytest.raises(ValueError) as e:  # 16's pair joins 24's, which already fills it
        pack_pair_batches({16: rows, 24: rows}, [24], 1, 0)
    assert str(e.value).startswith("2 pairs are packed at length 24 but the plan has room for 1")
    (batch,) = pack_pair_batches({16: [], 24: rows}, [24], 1, 0)  # an empty bucket is no bucket
    assert list(batch["index"]) == [0]
    with pytest.raises(ValueError) as e:
        pack_pair_batches({16: rows}, [16, 32, 16], 1, 0)
    assert str(e.value) == "the plan must list each bucket's batches together"


def test_pair_report_reasons_combine_round_trip_and_summarise():
    a = PairReport(read=3, kept=1, skipped=2, buckets={32: 1})
    a.reasons.update({"empty_response": 2})
    b = PairReport(read=1, kept=1, buckets={16: 1})
    total = PairReport.combine([a, b])
    assert total.reasons == {"empty_response": 2} and total.buckets == {16: 1, 32: 1}
    again = PairReport.from_dict(a.to_dict())
    assert again.reasons == {"empty_response": 2} and isinstance(again.reasons, Counter)
    assert total.summary() == (
        "pairs: read 4 = kept 2 + skipped 2 (empty_response: 2); "
        "truncated prompts 0, responses 0; buckets {16: 1, 32: 1}; padding pairs 0"
    )
    assert b.summary() == (
        "pairs: read 1 = kept 1 + skipped 0 (none); "
        "truncated prompts 0, responses 0; buckets {16: 1}; padding pairs 0"
    )
    b.reasons.update({"too_long": 1})
    assert (
        PairReport.combine([a, b])
        .summary()
        .startswith("pairs: read 4 = kept 2 + skipped 2 (empty_response: 2, too_long: 1); ")
    )
