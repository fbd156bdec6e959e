"""PLE's label enhancement: threshold schedule, routing by reward gap, batches, the combined
loss, principle placement; against hand computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import enhancement, training
from jaxalign.models import ModelConfig, Transformer


class CharTokenizer:
    """A character tokenizer: ids 3.. are bytes, 1 = BOS, 2 = end of turn, 0 = pad."""

    pad_token_id = 0

    def encode_prompt(self, prompt, use_chat_template=True):
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
        return [1] + [3 + (ord(c) % 60) for c in text]

    def encode_response(self, text, add_eos=True):
        return [3 + (ord(c) % 60) for c in text] + ([2] if add_eos else [])


# ----------------------------------------------------------------------------- schedule


def test_threshold_decays_geometrically():
    assert enhancement.threshold(0) == pytest.approx(0.2)
    assert enhancement.threshold(1) == pytest.approx(0.18)
    assert enhancement.threshold(3) == pytest.approx(0.2 * 0.9**3)
    assert enhancement.threshold(2, tau0=1.0, decay=0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        enhancement.threshold(-1)


def test_normalise_rewards_modes():
    r = np.array([[0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(enhancement.normalise_rewards(r, "minmax"), [[0, 1], [0.5, 0.5]])
    np.testing.assert_allclose(
        enhancement.normalise_rewards(r, "minmax", (0.0, 4.0)), [[0, 0.5], [0.25, 0.25]]
    )
    np.testing.assert_allclose(enhancement.normalise_rewards(r, "sigmoid"), 1 / (1 + np.exp(-r)))
    np.testing.assert_allclose(enhancement.normalise_rewards(r, "none"), r)
    np.testing.assert_allclose(enhancement.normalise_rewards(np.ones((2, 2))), 0.5)


def _records(n):
    return [
        {"id": f"q{i}", "prompt": f"x{i}", "response": f"y{i}", "principle_response": f"p{i}"}
        for i in range(n)
    ]


def test_route_pairs_by_gap():
    # gaps r(y_p) - r(y): +0.5, -0.3, +0.1, 0.0, exactly +0.2 (≤ τ stays SFT)
    rewards = np.array([[0.2, 0.7], [0.9, 0.6], [0.4, 0.5], [0.3, 0.3], [0.1, 0.3]])
    ranking, sft, counts = enhancement.route_pairs(_records(5), rewards, 0.2)
    assert [r["id"] for r in ranking] == ["q0", "q1"]
    assert (ranking[0]["chosen"], ranking[0]["rejected"]) == ("p0", "y0")
    assert (ranking[1]["chosen"], ranking[1]["rejected"]) == ("y1", "p1")
    assert [r["prompt"] for r in ranking] == ["x0", "x1"]  # the plain x, never x ⊕ p
    assert [(r["id"], r["response"]) for r in sft] == [
        ("q2", "y2"),
        ("q2", "p2"),
        ("q3", "y3"),
        ("q3", "p3"),
        ("q4", "y4"),
        ("q4", "p4"),
    ]
    np.testing.assert_allclose([r["weight"] for r in sft], [0.4, 0.5, 0.3, 0.3, 0.1, 0.3])
    assert all(r["prompt"] == f"x{r['id'][1:]}" for r in sft)
    assert (counts.considered, counts.ranking, counts.sft, counts.principle_better) == (5, 2, 3, 1)

    ranking, sft, counts = enhancement.route_pairs(_records(5), rewards, 0.2, direction="principle")
    assert [r["id"] for r in ranking] == ["q0"] and counts.sft == 4


def test_route_pairs_weighting_and_empty():
    recs = _records(2)
    recs[1]["response"] = "  "
    rewards = np.array([[0.0, 0.1], [0.5, 0.5]])
    ranking, sft, counts = enhancement.route_pairs(recs, rewards, 0.5, weighting="softmax")
    assert counts.skipped_empty == 1 and not ranking and len(sft) == 2
    w = np.exp([0.0, 0.1]) / np.exp([0.0, 0.1]).sum()
    np.testing.assert_allclose([r["weight"] for r in sft], w)
    _, sft, _ = enhancement.route_pairs(recs[:1], rewards[:1], 0.5, weighting="uniform")
    assert [r["weight"] for r in sft] == [1.0, 1.0]


def test_build_ple_batches_merges_streams():
    ranking = [
        {"prompt": "ab", "chosen": "good", "rejected": "bad"},
        {"prompt": "cd", "chosen": "yes", "rejected": "no", "rejected_eos": False},
    ]
    sft = [
        {"prompt": "ef", "response": "fine", "weight": 0.7},
        {"prompt": "gh", "response": "ok", "weight": 0.0},  # weight 0: left out
        {"prompt": "ij", "response": "x" * 30, "weight": 0.2, "eos": False},
    ]
    tok = CharTokenizer()
    batches, report = enhancement.build_ple_batches(
        ranking, sft, tok, batch_size=2, max_prompt_tokens=8, max_response_tokens=16
    )
    assert report["ranking_pairs"] == 2 and report["sft_rows"] == 2
    assert report["sft_zero_weight"] == 1 and report["truncated_responses"] == 1
    assert len(batches) == 2  # one merged batch, then a leftover SFT-only batch (new bucket)
    first, second = batches
    assert "chosen_ids" in first and "sft_ids" in first
    assert "chosen_ids" not in second and "sft_ids" in second
    row = first["sft_ids"][0]
    expected = tok.encode_prompt("ef") + tok.encode_response("fine")
    assert list(row[: len(expected)]) == expected and not row[len(expected) :].any()
    assert list(first["sft_loss_mask"][0][:7]) == [0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_allclose(first["sft_weight"], [0.7, 0.0])  # second row pads
    assert second["sft_loss_mask"][0].sum() == 16  # cut at 16 tokens, no EOS
    np.testing.assert_allclose(second["sft_weight"], [0.2, 0.0])
    # Each row names its record's position in the SFT list; a padding row -1.
    assert first["sft_index"].tolist() == [0, -1] and second["sft_index"].tolist() == [2, -1]
    sft_dtypes = {
        "sft_index": np.int32,
        "sft_ids": np.int32,
        "sft_attention_mask": np.int32,
        "sft_loss_mask": np.int32,
        "sft_weight": np.float32,
    }
    for batch in batches:
        assert {k: v.dtype for k, v in batch.items() if k.startswith("sft_")} == sft_dtypes


class FlagTokenizer(CharTokenizer):
    """CharTokenizer with pad id 9 that records each prompt's ``use_chat_template``."""

    pad_token_id = 9

    def __init__(self):
        self.flags = []

    def encode_prompt(self, prompt, use_chat_template=True):
        self.flags.append(use_chat_template)
        return super().encode_prompt(prompt)


class NoPadTokenizer:
    """A tokenizer without a ``pad_token_id`` attribute: rows pad with 0."""

    encode_prompt = CharTokenizer.encode_prompt
    encode_response = CharTokenizer.encode_response


def test_build_sft_batches_rows_buckets_and_counts_by_hand():
    """Prompts cut on the left to 8 tokens, responses on the right to 6, EOS as each record
    says; empty and weight-0 rows left out and counted; rows grouped by length bucket
    (min 4, capped at 8 + 6) in record order, two per batch, the last padded."""
    records = [
        {"prompt": "abcdefghij", "response": "xy", "weight": 0.5},  # prompt cut: 11 → 8
        {"prompt": "abcdefg", "response": "abcde"},  # 8 and 6 tokens: neither cut; weight 1
        {"prompt": "ab", "response": "0123456789", "eos": False, "weight": 0.25},  # cut: 10 → 6
        {"prompt": "q", "response": "", "eos": False},  # empty
        {"prompt": "r", "response": "s", "weight": 0.0},  # weight 0
        {"prompt": "klmnopqrstu", "response": "xyz", "eos": False, "weight": 2.0},  # cut 12 → 8
        {"prompt": "t", "response": "", "eos": False},  # empty
        {"prompt": "u", "response": "v", "weight": 0.0},  # weight 0
        {"prompt": "w", "response": "0123456789abc", "weight": 1.5},  # cut: 14 → 6
    ]
    tok = FlagTokenizer()
    batches, counts = enhancement.build_sft_batches(
        records, tok, batch_size=2, max_prompt_tokens=8, max_response_tokens=6, min_bucket=4
    )
    assert tok.flags and all(flag is True for flag in tok.flags)  # the default: chat template
    plain = CharTokenizer()
    rows = {}  # record index -> (prompt ids, response ids, weight)
    for k in (0, 1, 2, 5, 8):
        r = records[k]
        prompt = plain.encode_prompt(r["prompt"])[-8:]
        response = plain.encode_response(r["response"], add_eos=r.get("eos", True))[:6]
        rows[k] = (prompt, response, r.get("weight", 1.0))
    assert [len(rows[k][1]) for k in (0, 2, 5)] == [3, 6, 3]  # EOS, cut, no EOS
    # Lengths 11, 14, 9, 11, 8 → buckets 12, 14 (16 capped at 14), 12, 12, 8.
    expected = [(8, [8, None]), (12, [0, 2]), (12, [5, None]), (14, [1, None])]
    assert len(batches) == len(expected)
    for batch, (width, members) in zip(batches, expected, strict=True):
        assert batch["sft_ids"].shape == (2, width)
        assert batch["sft_index"].tolist() == [-1 if k is None else k for k in members]
        for i, k in enumerate(members):
            ids, attention = batch["sft_ids"][i], batch["sft_attention_mask"][i]
            loss, weight = batch["sft_loss_mask"][i], batch["sft_weight"][i]
            if k is None:
                assert (ids == 9).all() and not attention.any() and not loss.any() and weight == 0
                continue
            prompt, response, want_weight = rows[k]
            n, m = len(prompt), len(response)
            assert ids.tolist() == prompt + response + [9] * (width - n - m)
            assert attention.tolist() == [1] * (n + m) + [0] * (width - n - m)
            assert loss.tolist() == [0] * n + [1] * m + [0] * (width - n - m)
            assert weight == pytest.approx(want_weight)
    assert dict(counts) == {
        "kept": 5,
        "empty": 2,
        "zero_weight": 2,
        "truncated_prompts": 2,
        "truncated_responses": 2,
        "padding": 3,
    }
    # The flag is passed on; a tokenizer without a pad id pads with 0.
    tok = FlagTokenizer()
    enhancement.build_sft_batches(
        records[:1],
        tok,
        batch_size=2,
        max_prompt_tokens=8,
        max_response_tokens=6,
        use_chat_template=False,
    )
    assert tok.flags == [False]
    (batch,), _ = enhancement.build_sft_batches(
        records[:1], NoPadTokenizer(), batch_size=2, max_prompt_tokens=8, max_response_tokens=6
    )
    assert (batch["sft_ids"][1] == 0).all() and batch["sft_ids"][0, -1] == 0


def test_build_ple_batches_sizes_flags_and_report():
    """Ranking batches of ``batch_size`` pairs, SFT batches of ``sft_batch_size`` rows, merged
    k-th with k-th, leftovers single-kind; the chat-template flag reaches both builders."""
    ranking = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    sft = [{"prompt": f"s{i}", "response": "fine", "weight": 1.0} for i in range(2)]
    tok = FlagTokenizer()
    batches, report = enhancement.build_ple_batches(
        ranking,
        sft,
        tok,
        batch_size=2,
        sft_batch_size=3,
        max_prompt_tokens=8,
        max_response_tokens=8,
    )
    assert tok.flags and all(flag is True for flag in tok.flags)
    assert len(batches) == 2  # two ranking batches (2 + 1 pairs), one SFT batch of 3 rows
    assert batches[0]["chosen_ids"].shape[0] == 2 and batches[0]["sft_ids"].shape[0] == 3
    assert "sft_ids" not in batches[1] and batches[1]["chosen_ids"].shape[0] == 2
    assert report == {
        "ranking_pairs": 3,
        "ranking_padding": 1,
        "truncated_prompts": 0,
        "truncated_responses": 0,
        "sft_rows": 2,
        "sft_padding": 1,
        "sft_zero_weight": 0,
        "batches": 2,
    }
    tok = FlagTokenizer()
    batches, report = enhancement.build_ple_batches(
        [],
        sft,
        tok,
        batch_size=2,
        max_prompt_tokens=8,
        max_response_tokens=8,
        use_chat_template=False,
    )
    assert tok.flags == [False, False]
    assert len(batches) == 1 and batches[0]["sft_ids"].shape[0] == 2  # sft_batch_size: 2
    assert (report["ranking_pairs"], report["ranking_padding"]) == (0, 0)
    tok = FlagTokenizer()
    enhancement.build_ple_batches(
        ranking,
        [],
        tok,
        batch_size=2,
        max_prompt_tokens=8,
        max_response_tokens=8,
        use_chat_template=False,
    )
    assert tok.flags and not any(tok.flags)
    # Cuts are counted over both streams; an SFT-only report counts no pairs.
    long = {"prompt": "abcdefghijkl", "chosen": "good", "rejected": "bad"}
    cut = {"prompt": "ab", "chosen": "0123456789", "rejected": "bad"}
    _, report = enhancement.build_ple_batches(
        [long, cut],
        [{"prompt": "abcdefghijkl", "response": "ok"}, {"prompt": "ab", "response": "x" * 12}],
        CharTokenizer(),
        batch_size=2,
        max_prompt_tokens=8,
        max_response_tokens=8,
    )
    assert (report["truncated_prompts"], report["truncated_responses"]) == (2, 2)
    _, report = enhancement.build_ple_batches(
        [],
        [long | {"response": "ok"}],
        CharTokenizer(),
        batch_size=2,
        max_prompt_tokens=8,
        max_response_tokens=8,
    )
    assert report == {
        "ranking_pairs": 0,
        "ranking_padding": 0,
        "truncated_prompts": 1,
        "truncated_responses": 0,
        "sft_rows": 1,
        "sft_padding": 1,
        "sft_zero_weight": 0,
        "batches": 1,
    }


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=False,
        max_position_embeddings=64,
    )
    return Transformer(cfg, rngs=nnx.Rngs(1))


def _numpy_logps(model, ids, loss_mask):
    """Σ_t m_t · log softmax(logits_{t-1})[ids_t] from full logits, in float64."""
    logits, _ = model(jnp.asarray(ids), None, jnp.ones_like(jnp.asarray(ids)))
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out = np.zeros(ids.shape[0])
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if loss_mask[b, t]:
                out[b] += logp[b, t - 1, ids[b, t]]
    return out


def test_ple_loss_matches_hand_computation(tiny_model):
    tok = CharTokenizer()
    ranking = [
        {"prompt": "ab", "chosen": "good", "rejected": "bad"},
        {"prompt": "cd", "chosen": "yes", "rejected": "nope"},
    ]
    sft = [
        {"prompt": "ef", "response": "fine", "weight": 0.7},
        {"prompt": "ij", "response": "sure", "weight": 0.2},
    ]
    (batch,), _ = enhancement.build_ple_batches(
        ranking, sft, tok, batch_size=2, max_prompt_tokens=8, max_response_tokens=8
    )
    cfg = training.TrainConfig(logp_chunk_size=8)
    loss_fn = enhancement.ple_loss_fn(cfg, sft_coefficient=0.5)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, (aux, _) = loss_fn(tiny_model, jbatch, {}, 0, jax.random.PRNGKey(0))

    # Independent computation: full logits, numpy log-softmax, the formulas by hand.
    def mean_logp(prefix):
        ids, mask = batch[f"{prefix}_ids"], batch[f"{prefix}_loss_mask"]
        lengths = mask.sum(1)
        return _numpy_logps(tiny_model, ids, mask), lengths

    lc, nc = mean_logp("chosen")
    lr, nr = mean_logp("rejected")
    hinge = np.maximum(0.0, -(lc / nc - lr / nr))  # RRHF, margin 0
    l_rank = hinge.mean()
    ls, ns = mean_logp("sft")
    w = np.array([0.7, 0.2])
    l_sft = (w * (-ls / ns)).sum() / w.sum()
    np.testing.assert_allclose(float(aux["ple/ranking_loss"]), l_rank, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux["ple/sft_loss"]), l_sft, rtol=1e-5)
    np.testing.assert_allclose(float(loss), l_rank + 0.5 * l_sft, rtol=1e-5)
    assert float(aux["ple/ranking_rows"]) == 2 and float(aux["ple/sft_rows"]) == 2

    # A batch with only one kind of rows: the other term is absent (adds 0).
    only_sft = {k: v for k, v in jbatch.items() if k.startswith("sft_")}
    loss2, (aux2, _) = loss_fn(tiny_model, only_sft, {}, 0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(loss2), 0.5 * l_sft, rtol=1e-5)
    assert float(aux2["ple/ranking_rows"]) == 0


def test_ple_loss_ignores_weight_zero_rows(tiny_model):
    tok = CharTokenizer()
    ranking = [{"prompt": "ab", "chosen": "good", "rejected": "bad"}]
    sft = [{"prompt": "ef", "response": "fine", "weight": 1.0}]
    (batch,), _ = enhancement.build_ple_batches(
        ranking, sft, tok, batch_size=2, max_prompt_tokens=8, max_response_tokens=8
    )
    loss_fn = enhancement.ple_loss_fn(training.TrainConfig(logp_chunk_size=8))
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    base, _ = loss_fn(tiny_model, jb, {}, 0, None)
    # Scribble over the padding rows (weight 0): the loss must not move.
    jb2 = dict(jb)
    for k in ("chosen_ids", "rejected_ids", "sft_ids"):
        jb2[k] = jb[k].at[1].set(7)
    for k in ("chosen_loss_mask", "rejected_loss_mask", "sft_loss_mask"):
        jb2[k] = jb[k].at[1, 2:5].set(1)
    moved, _ = loss_fn(tiny_model, jb2, {}, 0, None)
    np.testing.assert_allclose(float(moved), float(base), rtol=1e-6)
    # c = 1 by default; the row counts leave the weight-0 rows out, as float32 metrics
    _, (aux, _) = loss_fn(tiny_model, jb, {}, 0, None)
    np.testing.assert_allclose(
        float(base), float(aux["ple/ranking_loss"]) + float(aux["ple/sft_loss"]), rtol=1e-6
    )
    assert float(aux["ple/ranking_rows"]) == 1 and float(aux["ple/sft_rows"]) == 1
    assert aux["ple/ranking_rows"].dtype == aux["ple/sft_rows"].dtype == jnp.float32
    only_pairs = {k: v for k, v in jb.items() if not k.startswith("sft_")}
    alone, (aux, _) = loss_fn(tiny_model, only_pairs, {}, 0, None)
    assert float(aux["ple/sft_rows"]) == 0 and "ple/sft_loss" not in aux
    np.testing.assert_allclose(float(alone), float(aux["ple/ranking_loss"]), rtol=1e-6)
    with pytest.raises(ValueError) as e:
        loss_fn(tiny_model, {"weight": jb["weight"]}, {}, 0, None)
    assert str(e.value) == "a PLE batch needs pair fields, sft_* fields, or both"


# ----------------------------------------------------------------------------- prompts


def test_principled_prompt_placements():
    assert enhancement.principled_prompt("Q?", "Be good.") == "Be good.\n\nQ?"
    assert enhancement.principled_prompt("Q?", "Be good.", "suffix") == "Q?\n\nBe good."
    assert enhancement.principled_prompt("Q?", "Be good.", "system") == [
        {"role": "system", "content": "Be good."},
        {"role": "user", "content": "Q?"},
    ]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    chat.append({"role": "user", "content": "c"})
    out = enhancement.principled_prompt(chat, "P")
    assert out[0]["content"] == "a" and out[2]["content"] == "P\n\nc" and chat[2]["content"] == "c"


def test_sft_records_are_each_pairs_chosen_response():
    assert enhancement.sft_records(
        [{"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}]
    ) == [{"id": "a", "prompt": "p", "response": "c", "eos": True, "weight": 1.0}]


def test_threshold_and_normalisation_edges():
    with pytest.raises(ValueError) as e:
        enhancement.threshold(-1)
    assert str(e.value) == "iteration must be >= 0, got -1"
    assert isinstance(enhancement.threshold(1, tau0=1, decay=1), float)
    # outside the given range: clipped to [0, 1]; a degenerate range: all 0.5
    np.testing.assert_array_equal(
        enhancement.normalise_rewards(np.array([-1.0, 0.5, 3.0]), "minmax", (0.0, 2.0)),
        [0.0, 0.25, 1.0],
    )
    np.testing.assert_array_equal(
        enhancement.normalise_rewards(np.array([1.0, 2.0]), "minmax", (1.0, 1.0)), [0.5, 0.5]
    )
    empty = enhancement.normalise_rewards(np.zeros((0, 2)))
    assert empty.shape == (0, 2) and empty.dtype == np.float64
    got = enhancement.normalise_rewards(np.array([1, 3], np.int32))
    assert got.dtype == np.float64 and list(got) == [0.0, 1.0]
    assert enhancement.normalise_rewards(np.array([1, 3], np.int32), "none").dtype == np.float64
    with pytest.raises(ValueError) as e:
        enhancement.normalise_rewards(np.ones(2), "rank")
    assert str(e.value) == "reward normalisation must be minmax, sigmoid or none, got 'rank'"


def test_sft_weights_by_hand():
    w_y, w_yp = enhancement.sft_weights(np.array([-0.5, 0.25]), np.array([0.75, -1.0]))
    np.testing.assert_array_equal(w_y, [0.0, 0.25])  # "reward": clipped at 0
    np.testing.assert_array_equal(w_yp, [0.75, 0.0])
    w_y, w_yp = enhancement.sft_weights(np.array([0.0, 1.0]), np.array([1.0, 1.0]), "softmax")
    np.testing.assert_allclose(w_y, [1 / (1 + np.e), 0.5])
    np.testing.assert_allclose(w_yp, [np.e / (1 + np.e), 0.5])
    for mode in ("reward", "softmax", "uniform"):  # float64 whatever comes in
        w_y, w_yp = enhancement.sft_weights(
            np.array([0.5], np.float32), np.array([0.25], np.float32), mode
        )
        assert w_y.dtype == w_yp.dtype == np.float64, mode
    w_y, w_yp = enhancement.sft_weights(np.array([0.3]), np.array([0.9]), "uniform")
    assert list(w_y) == [1.0] and list(w_yp) == [1.0]
    with pytest.raises(ValueError) as e:
        enhancement.sft_weights(np.ones(1), np.ones(1), "rank")
    assert str(e.value) == "SFT weighting must be reward, softmax or uniform, got 'rank'"


def test_route_pairs_writes_every_field():
    """A ranking record's every field, both ways round (the EOS flags follow their
    responses), and an SFT record's; a missing EOS flag means finished."""
    recs = _records(3)
    recs[0].update(response_eos=False)  # y cut, y_p finished; y_p wins
    recs[1].update(principle_response_eos=False)  # y_p cut; y wins
    rewards = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.55]])
    ranking, sft, counts = enhancement.route_pairs(recs, rewards, 0.2)
    assert ranking == [
        {
            "id": "q0",
            "prompt": "x0",
            "chosen": "p0",
            "rejected": "y0",
            "chosen_eos": True,
            "rejected_eos": False,
            "chosen_source": "principle",
            "gap": pytest.approx(0.8),
        },
        {
            "id": "q1",
            "prompt": "x1",
            "chosen": "y1",
            "rejected": "p1",
            "chosen_eos": True,
            "rejected_eos": False,
            "chosen_source": "plain",
            "gap": pytest.approx(-0.6),
        },
    ]
    assert sft == [
        {
            "id": "q2",
            "prompt": "x2",
            "response": "y2",
            "eos": True,
            "weight": 0.5,
            "source": "plain",
            "gap": pytest.approx(0.05),
        },
        {
            "id": "q2",
            "prompt": "x2",
            "response": "p2",
            "eos": True,
            "weight": 0.55,
            "source": "principle",
            "gap": pytest.approx(0.05),
        },
    ]
    assert dataclasses.asdict(counts) == {
        "considered": 3,
        "ranking": 2,
        "sft": 1,
        "skipped_empty": 0,
        "principle_better": 1,
    }
    # "principle": y_p must win by more than τ; a larger y win stays SFT
    ranking, sft, counts = enhancement.route_pairs(recs, rewards, 0.2, direction="principle")
    assert [r["id"] for r in ranking] == ["q0"] and counts.sft == 2


def test_route_pairs_names_what_is_wrong():
    recs = _records(2)
    with pytest.raises(ValueError) as e:
        enhancement.route_pairs(recs, np.zeros((3, 2)), 0.2)
    assert str(e.value) == "rewards must have shape [2, 2], got (3, 2)"
    with pytest.raises(ValueError) as e:
        enhancement.route_pairs(recs, np.zeros((2, 2)), 0.2, direction="worse")
    assert str(e.value) == "ranking direction must be better or principle, got 'worse'"
    recs[0]["principle_response"] = "\n"
    _, sft, counts = enhancement.route_pairs(recs, np.zeros((2, 2)), 0.2)
    assert counts.skipped_empty == 1 and counts.considered == 2 and len(sft) == 2
    _, _, counts = enhancement.route_pairs([recs[0]] * 3, np.zeros((3, 2)), 0.2)
    assert counts.skipped_empty == 3


def test_route_pairs_at_the_threshold_and_in_float64():
    """A gap of exactly τ stays SFT in both directions (the test is ``>``); the gap is taken
    in float64 whatever dtype the rewards come in."""
    exact = np.array([[0.25, 0.5], [0.5, 0.25]])  # gaps ±0.25, exact in binary
    for direction in ("better", "principle"):
        ranking, _, counts = enhancement.route_pairs(_records(2), exact, 0.25, direction=direction)
        assert not ranking and counts.sft == 2
    r32 = np.array([[0.1, 0.3]], np.float32)
    ranking, _, _ = enhancement.route_pairs(_records(1), r32, 0.1)
    assert ranking[0]["gap"] == float(np.float64(r32[0, 1]) - np.float64(r32[0, 0]))


def test_principled_prompt_with_chat_messages():
    system = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    assert enhancement.principled_prompt(system, "P", "system") == [
        {"role": "system", "content": "P\n\nS"},
        {"role": "user", "content": "u"},
    ]
    assert system[0]["content"] == "S"  # the caller's messages are not changed
    user = [{"role": "user", "content": "u"}]
    assert enhancement.principled_prompt(user, "P", "system") == [
        {"role": "system", "content": "P"},
        {"role": "user", "content": "u"},
    ]
    assert enhancement.principled_prompt(user, "P", "suffix") == [
        {"role": "user", "content": "u\n\nP"}
    ]
    two = [*user, {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    assert enhancement.principled_prompt(two, "P", "suffix")[::2] == [
        {"role": "user", "content": "u"},
        {"role": "user", "content": "v\n\nP"},
    ]
    with pytest.raises(ValueError) as e:
        enhancement.principled_prompt([{"role": "assistant", "content": "a"}], "P")
    assert str(e.value) == "a chat prompt needs a user message to add the principles to"
    with pytest.raises(ValueError) as e:
        enhancement.principled_prompt("q", "P", "middle")
    assert str(e.value) == "principle placement must be prefix, suffix or system, got 'middle'"
