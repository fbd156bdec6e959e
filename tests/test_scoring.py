"""Scoring passes: reference and judge log-probs over pair batches (sharded or not), and
log-probs of exact token ids, against independent references."""

import numpy as np
from flax import nnx
from tiny_pairs import TINY, CharTokenizer, tiny_batches

from jaxalign import parallel, scoring, training
from jaxalign.models.llama import Transformer


def _batches():
    return tiny_batches(8)


def test_reference_and_judge_log_probs_sharded_over_a_mesh_equal_one_device():
    """with_reference_logps / response_logps on a (data 2, fsdp 2, tensor 2) mesh equal
    the single-device pass, row for row (padding rows included)."""
    import types

    mesh = parallel.make_mesh(2, 2, 2)
    graphdef, params = nnx.split(Transformer(TINY, rngs=nnx.Rngs(1)))
    batches = _batches()
    config = training.TrainConfig(batch_size=4, logp_chunk_size=8)
    one = scoring.with_reference_logps(graphdef, params, batches, config)
    sharded = scoring.with_reference_logps(graphdef, params, batches, config, mesh=mesh)
    for a, b in zip(one, sharded, strict=True):
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            assert isinstance(b[key], np.ndarray) and b[key].shape == (4,)
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5)
    assert np.abs(one[0]["ref_chosen_logps"]).min() > 1  # real log-probs, not zeros

    records = [
        {"id": str(i), "prompt": f"q{i}", "chosen": "a" * (i + 1), "rejected": "bc" * i}
        for i in range(1, 7)
    ]
    cfg = types.SimpleNamespace(
        train=config,
        data=types.SimpleNamespace(
            max_prompt_tokens=16, max_response_tokens=16, use_chat_template=False
        ),
    )
    plain = scoring.response_logps(graphdef, params, records, CharTokenizer(), cfg)
    on_mesh = scoring.response_logps(graphdef, params, records, CharTokenizer(), cfg, mesh)
    np.testing.assert_allclose(on_mesh, plain, rtol=1e-5, atol=1e-5)
    assert plain.shape == (6, 2) and np.all(plain < 0)


def test_response_logprobs_match_transformers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxalign.models import load

    model, tokenizer = load(tiny_model_dir)
    prompts = ["Name a colour.", [{"role": "user", "content": "What is 2+2?"}], "Hi"]
    rng = np.random.default_rng(1)
    responses = [
        rng.integers(0, tokenizer.vocab_size, n).tolist() + [tokenizer.end_of_turn_id]
        for n in (3, 20, 1)
    ]
    ours = scoring.response_logprobs(
        model, tokenizer, prompts, responses, batch_size=2, chunk_size=16
    )
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids = tokenizer.encode_prompt(prompt)
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
        n = len(prompt_ids)
        want = sum(logp[n + j - 1, t].item() for j, t in enumerate(response))
        assert abs(ours[i] - want) < 1e-4 * max(1.0, abs(want)), (i, ours[i], want)


def test_reward_scores_in_record_order_equal_one_row_at_a_time():
    """Rows of mixed lengths, scored shortest first in padded batches, come back in their
    own order with the score each gets alone (no padding around it)."""
    from jaxalign.models.reward import RewardModel

    backbone = Transformer(TINY, rngs=nnx.Rngs(2))
    score = np.random.default_rng(0).normal(size=(TINY.hidden_size, 1)).astype(np.float32)
    model = RewardModel(backbone, score)
    rng = np.random.default_rng(1)
    rows = [rng.integers(3, 128, n).tolist() for n in (9, 2, 17, 5, 1)]
    got = scoring.reward_scores(model, rows, pad_id=0, batch_size=2, max_length=32)
    assert got.dtype == np.float32 and got.shape == (5,)
    for row, g in zip(rows, got, strict=True):
        ids = np.asarray([row], np.int32)
        want = float(model(ids, np.ones_like(ids))[0])
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_packed_passes_equal_the_batch_by_batch_passes():
    """With ``train.pack_sequences`` (the default) a one-device pass packs every sequence of
    all batches into shared rows of the longest batch's length, several calls of ``2B`` rows
    here: the same log-probs as scoring each batch's rows as they are, padding pairs 0."""
    import dataclasses

    from jaxalign.data.pairs import build_pair_batches

    records = [
        {"prompt": f"question {i}?", "chosen": "yes " * (i % 7 + 1), "rejected": "n" * (i % 4)}
        for i in range(23)  # 23 pairs in batches of 4: the last has a padding pair
    ]
    batches, _ = build_pair_batches(
        records, CharTokenizer(), batch_size=4, max_prompt_tokens=16, max_response_tokens=32
    )
    assert len({b["chosen_ids"].shape[1] for b in batches}) > 1  # several buckets
    graphdef, params = nnx.split(Transformer(TINY, rngs=nnx.Rngs(3)))
    packed = training.TrainConfig(batch_size=4, logp_chunk_size=8)
    assert packed.pack_sequences and scoring.packs(packed, None)
    plain = dataclasses.replace(packed, pack_sequences=False)
    got = scoring.with_reference_logps(graphdef, params, batches, packed)
    want = scoring.with_reference_logps(graphdef, params, batches, plain)
    for a, b in zip(got, want, strict=True):
        real = a["weight"] > 0
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            np.testing.assert_allclose(a[key][real], b[key][real], rtol=2e-5, atol=2e-5)
            np.testing.assert_array_equal(a[key][~real], 0.0)
    assert (~(got[-1]["weight"] > 0)).any()
    assert np.abs(got[0]["ref_chosen_logps"]).min() > 1


def test_packed_logps_are_each_sequence_scored_alone():
    """:func:`scoring.packed_logps` against each sequence's own unpadded forward pass
    (:func:`training.sequence_logps` on a one-row batch): rows shared by several sequences,
    more sequences than one call holds, one sequence filling a whole row."""
    import jax.numpy as jnp

    graphdef, params = nnx.split(Transformer(TINY, rngs=nnx.Rngs(5)))
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(0)
    lengths = [16, 3, 9, 5, 12, 2, 7, 7, 4, 11, 6]
    sequences = []
    for n in lengths:
        ids = rng.integers(1, TINY.vocab_size, n).astype(np.int32)
        loss = (np.arange(n) >= n // 3).astype(np.int32)
        sequences.append((ids, loss))
    got = scoring.packed_logps(graphdef, params, sequences, length=16, rows=2, chunk_size=4)
    for (ids, loss), value in zip(sequences, got, strict=True):
        want, _ = training.sequence_logps(
            model, jnp.asarray(ids[None]), jnp.ones((1, len(ids)), jnp.int32), loss[None], 4
        )
        np.testing.assert_allclose(value, float(want[0]), rtol=2e-5, atol=2e-5)
    assert got.shape == (len(lengths),) and np.all(got < 0)
