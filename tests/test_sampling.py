"""Tests for jaxalign.sampling: cached decode vs full forward, filters, statistics,
n samples per prompt, sharding, and compile reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jaxalign import parallel, sampling
from jaxalign.models import ModelConfig, Transformer
from jaxalign.sampling import (
    SamplingConfig,
    decode_step,
    filter_logits,
    generate,
    min_p_filter,
    prefill,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # peaked distributions, so greedy paths are well separated
    )
    return Transformer(config, rngs=nnx.Rngs(0))


def left_padded(prompts, pad=0):
    """``[B, P]`` ids and mask, each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = True
    return jnp.asarray(ids), jnp.asarray(mask)


PROMPTS = [[5, 17, 3, 44, 9], [8, 1, 2, 3, 4, 70, 71, 72, 60], [33, 12, 90]]


def full_forward_logits(model, prompt, generated):
    """Logits ``[len(generated), V]`` predicting each generated token, from one
    uncached forward pass over ``prompt + generated`` (no padding at all)."""
    seq = jnp.asarray([list(prompt) + list(generated)], jnp.int32)
    logits, _ = model(seq)
    start = len(prompt) - 1
    return np.asarray(logits[0, start : start + len(generated)])


def keep_set(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered)[0])).tolist())


# ---------------------------------------------------------------------------
# Cached decoding equals a full forward pass.


def test_cached_decode_logits_match_full_forward(model):
    ids, mask = left_padded(PROMPTS)
    steps = 8
    config = SamplingConfig(max_new_tokens=steps, greedy=True, return_logprobs=True)
    out = generate(model, ids, mask, jax.random.key(0), config)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (3, steps)
    assert np.all(np.asarray(out.lengths) == steps) and not np.any(np.asarray(out.finished))

    # Re-run the loop's own prefill and decode steps, keeping every step's full logits.
    logits, cache = prefill(model, ids, mask, ids.shape[1] + steps)
    cache = sampling.DecodeCache.from_kv_cache(cache)
    positions = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    cached = [np.asarray(logits)]
    for t in range(steps - 1):
        logits, cache = decode_step(model, cache, jnp.asarray(tokens[:, t]), positions + t)
        cached.append(np.asarray(logits))
    cached = np.stack(cached, axis=1)  # [B, steps, V]

    for i, prompt in enumerate(PROMPTS):
        reference = full_forward_logits(model, prompt, tokens[i])
        np.testing.assert_allclose(cached[i], reference, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(tokens[i], reference.argmax(-1))
        ref_logprobs = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
        picked = ref_logprobs[np.arange(steps), tokens[i]]
        np.testing.assert_allclose(np.asarray(out.logprobs[i]), picked, atol=1e-4)


def test_bfloat16_cache_stays_close(model):
    ids, mask = left_padded(PROMPTS)
    config = SamplingConfig(max_new_tokens=6, greedy=True, return_logprobs=True)
    exact = generate(model, ids, mask, jax.random.key(0), config)
    half = generate(model, ids, mask, jax.random.key(0), config.replace(cache_dtype="bfloat16"))
    tokens = np.asarray(exact.tokens)
    for i, prompt in enumerate(PROMPTS):  # score the bf16 path's choices in float32
        reference = full_forward_logits(model, prompt, np.asarray(half.tokens[i]))
        ref_logprobs = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
        picked = ref_logprobs[np.arange(6), np.asarray(half.tokens[i])]
        np.testing.assert_allclose(np.asarray(half.logprobs[i]), picked, atol=0.05)
    assert (np.asarray(half.tokens) == tokens).mean() > 0.8


def test_eos_stops_rows_and_pads(model):
    ids, mask = left_padded(PROMPTS)
    free = generate(model, ids, mask, jax.random.key(0), SamplingConfig(12, greedy=True))
    free_tokens = np.asarray(free.tokens)
    eos = int(free_tokens[1, 3])  # row 1 emits it at step 3 (maybe other rows earlier)
    config = SamplingConfig(12, greedy=True, eos_token_ids=(eos,), pad_token_id=0)
    out = generate(model, ids, mask, jax.random.key(0), config)
    for i in range(3):
        hits = np.flatnonzero(free_tokens[i] == eos)
        if hits.size:
            end = hits[0] + 1
            assert out.finished[i] and out.lengths[i] == end
            np.testing.assert_array_equal(out.tokens[i, :end], free_tokens[i, :end])
            assert np.all(np.asarray(out.tokens[i, end:]) == 0)
        else:
            assert not out.finished[i] and out.lengths[i] == 12
    assert out.lengths[1] == 4


# ---------------------------------------------------------------------------
# Filters keep exactly the hand-computed sets.


def test_top_k_keeps_k_largest_and_ties():
    logits = jnp.asarray([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert keep_set(top_k_filter(logits, 2)) == {1, 3}
    assert keep_set(top_k_filter(logits, 1)) == {1}
    assert keep_set(top_k_filter(logits, 5)) == {0, 1, 2, 3, 4}
    ties = jnp.asarray([[3.0, 1.0, 3.0, 3.0, 0.0]])
    assert keep_set(top_k_filter(ties, 2)) == {0, 2, 3}  # ties with the 2nd are kept
    np.testing.assert_array_equal(np.asarray(top_k_filter(logits, 2))[0, [1, 3]], [5.0, 4.0])


def test_top_p_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.3, 0.5, 0.05, 0.15]]))  # sorted: .5 .3 .15 .05
    assert keep_set(top_p_filter(logits, 0.7)) == {0, 1}  # .5 < .7, .5+.3 >= .7
    assert keep_set(top_p_filter(logits, 0.85)) == {0, 1, 3}  # needs .5+.3+.15
    assert keep_set(top_p_filter(logits, 0.99)) == {0, 1, 2, 3}
    assert keep_set(top_p_filter(logits, 0.3)) == {1}
    assert keep_set(top_p_filter(logits, 0.01)) == {1}  # the top token is always kept
    spread = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
    assert keep_set(top_p_filter(spread, 0.65)) == {0, 1}


def test_top_p_keeps_ties_at_the_boundary():
    ties = jnp.log(jnp.asarray([[0.2, 0.4, 0.2, 0.2]]))
    assert keep_set(top_p_filter(ties, 0.5)) == {0, 1, 2, 3}  # any one .2 would do
    assert keep_set(top_p_filter(ties, 0.3)) == {1}
    flat = jnp.zeros((1, 4))
    assert keep_set(top_p_filter(flat, 0.1)) == {0, 1, 2, 3}


def test_min_p_threshold_relative_to_top():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]]))
    assert keep_set(min_p_filter(logits, 0.5)) == {1, 2}  # p >= 0.25
    assert keep_set(min_p_filter(logits, 0.2)) == {1, 2, 3}  # p >= 0.1
    assert keep_set(min_p_filter(logits, 1.0)) == {1}


def test_filters_apply_after_temperature():
    # T=0.5 turns probs .5/.3/.15/.05 into ∝ .25/.09/.0225/.0025 (normalised
    # .6983/.2514/.0628/.0070): top-p 0.9 then keeps the first two only.
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert keep_set(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.9))) == {
        0,
        1,
        2,
    }
    assert keep_set(filter_logits(logits, SamplingConfig(temperature=0.5, top_p=0.9))) == {0, 1}
    both = SamplingConfig(temperature=1.0, top_k=3, min_p=0.5)
    assert keep_set(filter_logits(logits, both)) == {0, 1}


# ---------------------------------------------------------------------------
# Sampling frequencies.


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_matches_softmax():
    raw = np.asarray([1.0, 0.5, 0.0, -0.5, -2.0], np.float32)
    temperature = 0.7
    draws = 200_000
    logits = jnp.broadcast_to(jnp.asarray(raw), (draws, raw.size))
    config = SamplingConfig(temperature=temperature)
    tokens = np.asarray(sample_tokens(logits, jax.random.key(123), config))
    counts = np.bincount(tokens, minlength=raw.size).astype(np.float64)
    expected = np.exp(raw / temperature) / np.exp(raw / temperature).sum()
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
    assert chi_square(counts, expected) < 18.47
    assert np.max(np.abs(counts / draws - expected)) < 4 * np.sqrt(0.25 / draws)


def test_two_level_draw_across_blocks():
    # 700 tokens: blocks of 256, the last one padded; mass on a few tokens in every block,
    # including block edges, and none elsewhere.
    vocab, draws = 700, 200_000
    support = np.asarray([3, 255, 256, 511, 600, 699])
    raw = np.full(vocab, -np.inf, np.float32)
    raw[support] = [0.0, 1.0, -1.0, 0.5, 2.0, -0.5]
    logits = jnp.broadcast_to(jnp.asarray(raw), (draws, vocab))
    tokens = np.asarray(sampling.categorical(jax.random.key(5), logits))
    counts = np.bincount(tokens, minlength=vocab).astype(np.float64)
    assert counts.sum() == counts[support].sum()  # never a zero-probability token
    expected = np.exp(raw[support]) / np.exp(raw[support]).sum()
    assert chi_square(counts[support], expected) < 20.52  # 5 dof, p = 0.001


def test_blocked_argmax_matches_numpy_and_takes_the_first_tie():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 700)).astype(np.float32)
    logits[1, [10, 300]] = 9.0  # tie across blocks
    logits[2, [520, 521]] = 9.0  # tie inside the padded last block
    got = np.asarray(sampling.argmax(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got[1] == 10 and got[2] == 520


def test_filtered_sampling_renormalises_over_kept_tokens():
    raw = np.log(np.asarray([0.4, 0.3, 0.2, 0.1], np.float32))
    draws = 100_000
    logits = jnp.broadcast_to(jnp.asarray(raw), (draws, raw.size))
    config = SamplingConfig(temperature=1.0, top_k=2)
    tokens = np.asarray(sample_tokens(logits, jax.random.key(7), config))
    counts = np.bincount(tokens, minlength=4).astype(np.float64)
    assert counts[2] == 0 and counts[3] == 0
    assert chi_square(counts[:2], np.asarray([4 / 7, 3 / 7])) < 10.83  # 1 dof, p = 0.001


# ---------------------------------------------------------------------------
# n samples per prompt, determinism, compile reuse, sharding.


def test_n_samples_share_the_prompt(model):
    ids, mask = left_padded(PROMPTS)
    n, steps = 3, 6
    greedy1 = generate(model, ids, mask, jax.random.key(0), SamplingConfig(steps, greedy=True))
    greedy3 = generate(model, ids, mask, jax.random.key(0), SamplingConfig(steps, greedy=True, n=n))
    np.testing.assert_array_equal(
        np.asarray(greedy3.tokens), np.repeat(np.asarray(greedy1.tokens), n, axis=0)
    )

    config = SamplingConfig(steps, temperature=1.5, n=n, return_logprobs=True)
    out = generate(model, ids, mask, jax.random.key(1), config)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (len(PROMPTS) * n, steps)
    for i, prompt in enumerate(PROMPTS):
        rows = tokens[i * n : (i + 1) * n]
        assert len({tuple(r) for r in rows}) > 1  # samples differ
        for j, row in enumerate(rows):  # each is conditioned on prompt i
            reference = full_forward_logits(model, prompt, row)
            ref_logprobs = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
            np.testing.assert_allclose(
                np.asarray(out.logprobs[i * n + j]),
                ref_logprobs[np.arange(steps), row],
                atol=1e-4,
            )
    again = generate(model, ids, mask, jax.random.key(1), config)
    np.testing.assert_array_equal(np.asarray(again.tokens), tokens)  # same key, same tokens
    other = generate(model, ids, mask, jax.random.key(2), config)
    assert not np.array_equal(np.asarray(other.tokens), tokens)


def test_same_shapes_compile_once(model):
    config = SamplingConfig(5, temperature=1.0, n=2)
    ids, mask = left_padded(PROMPTS)
    generate(model, ids, mask, jax.random.key(0), config)
    before = sampling.trace_count()
    for seed in range(3):
        generate(model, ids, mask, jax.random.key(seed), config)
    assert sampling.trace_count() == before
    wider, wider_mask = left_padded([[1] * 12] + PROMPTS[1:])
    generate(model, wider, wider_mask, jax.random.key(0), config)
    assert sampling.trace_count() == before + 1


def test_sharded_matches_unsharded(model):
    devices = np.asarray(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes them on CPU)")
    mesh = Mesh(devices.reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    prompts = PROMPTS + [[7, 7, 1], [2] * 9, [50, 60], [11, 12, 13, 14], [90, 91, 92, 93, 94]]
    ids, mask = left_padded(prompts)
    for config in (
        SamplingConfig(6, greedy=True, n=2),
        SamplingConfig(6, temperature=1.0, top_k=20, n=2),
    ):
        plain = generate(model, ids, mask, jax.random.key(3), config)
        split = generate(model, ids, mask, jax.random.key(3), config, mesh=mesh)
        assert len(split.tokens.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(plain.tokens))
        np.testing.assert_array_equal(np.asarray(split.lengths), np.asarray(plain.lengths))


def test_sharded_parameters_match_unsharded(model):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes them on CPU)")
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, parallel.shard_model_state(state, mesh))
    ids, mask = left_padded(PROMPTS + [[4, 5, 6]])
    config = SamplingConfig(6, greedy=True, n=2)
    plain = generate(model, ids, mask, jax.random.key(0), config)
    split = generate(sharded, ids, mask, jax.random.key(0), config, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(plain.tokens))


def test_sharded_batch_must_divide():
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    small = Transformer(
        ModelConfig(
            vocab_size=11,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
        ),
        rngs=nnx.Rngs(0),
    )
    ids, mask = left_padded([[1, 2, 3]] * 3)
    with pytest.raises(ValueError, match="multiple of the mesh's data-parallel size"):
        generate(small, ids, mask, jax.random.key(0), SamplingConfig(2), mesh=mesh)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("temperature", 0.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("min_p", -0.1, "min_p"),
        ("top_k", -1, "top_k"),
        ("n", 0, "sampling.n"),
        ("eos_token_ids", [-2], "eos_token_ids"),
        ("eos_token_ids", "2", "eos_token_ids"),
        ("cache_dtype", "int4", "dtype"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{field: value})


def test_greedy_allows_zero_temperature():
    assert SamplingConfig(greedy=True, temperature=0.0).greedy


def test_eos_list_becomes_a_hashable_tuple():
    config = SamplingConfig(eos_token_ids=[2, 3])
    assert config.eos_token_ids == (2, 3) and hash(config)


def test_context_overflow_is_reported(model):
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=250))


# ---------------------------------------------------------------------------
# The shrinking batch: rows that ended stop costing a step; the samples stay the same.


def test_shrink_sizes_halve_down_to_the_floor():
    assert sampling.shrink_sizes(64, True) == (64, 32, 16, 8)
    assert sampling.shrink_sizes(32, True) == (32, 16, 8)
    assert sampling.shrink_sizes(16, True) == (16, 8)
    assert sampling.shrink_sizes(24, True) == (24, 12)  # 6 is below the floor
    assert sampling.shrink_sizes(15, True) == (15,)  # an odd count stays whole
    assert sampling.shrink_sizes(8, True) == (8,)
    assert sampling.shrink_sizes(64, False) == (64,)
    assert sampling.shrink_sizes(64, None) == sampling.shrink_sizes(64, True)  # CPU: on


def expected_row_steps(lengths, finished, sizes, max_new):
    """Rows × steps of a chain of decode loops, counted one step at a time: row ``r`` still
    runs before step ``s`` when it has not ended (``lengths[r] > s``, or it never ended)."""

    def running(s):
        return sum((n > s) or not f for n, f in zip(lengths, finished, strict=True))

    total, step = sizes[0], 1  # step 0 comes from the prefill, one token per row
    for size, smaller in zip(sizes, (*sizes[1:], 0), strict=True):
        while step < max_new and running(step) > smaller:
            total += size
            step += 1
    return total


@pytest.mark.parametrize("eos", [(3, 5, 7, 11, 13), tuple(range(1, 30))])
def test_shrinking_batch_keeps_every_sample(model, eos):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, VOCAB, (16, 7)), jnp.int32)
    mask = jnp.ones((16, 7), bool)
    config = SamplingConfig(40, temperature=1.3, n=2, eos_token_ids=eos, return_logprobs=True)
    whole = generate(model, ids, mask, jax.random.key(1), config.replace(shrink_batch=False))
    shrunk = generate(model, ids, mask, jax.random.key(1), config.replace(shrink_batch=True))
    for field in ("tokens", "lengths", "finished"):
        np.testing.assert_array_equal(
            np.asarray(getattr(shrunk, field)), np.asarray(getattr(whole, field)), err_msg=field
        )
    # A matmul over fewer rows may round its last bit differently.
    np.testing.assert_allclose(np.asarray(shrunk.logprobs), np.asarray(whole.logprobs), atol=1e-5)
    lengths, finished = np.asarray(whole.lengths).tolist(), np.asarray(whole.finished).tolist()
    assert sum(finished) > 0 and len(set(lengths)) > 2, "the fixture should end rows apart"
    assert int(whole.row_steps) == 32 * max(lengths)
    assert int(shrunk.row_steps) == expected_row_steps(lengths, finished, (32, 16, 8), 40)
    assert int(shrunk.row_steps) < int(whole.row_steps)


def test_shrinking_batch_decodes_every_row_while_none_ends(model):
    ids, mask = left_padded(PROMPTS * 4)  # 24 rows: sizes 24, 12
    config = SamplingConfig(12, greedy=True, n=2, shrink_batch=True)
    out = generate(model, ids, mask, jax.random.key(0), config)
    plain = generate(model, ids, mask, jax.random.key(0), config.replace(shrink_batch=False))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
    assert int(out.row_steps) == 24 * 12  # nothing ended: all rows, every step
