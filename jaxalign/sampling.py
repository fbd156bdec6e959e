"""Sampled decoding: prefill once, broadcast the KV cache, decode in one compiled loop.

``generate(model, prompt_ids, prompt_mask, key, config)`` draws ``config.n``
continuations of every prompt. The prompt batch is left-padded, so every row's
last prompt token sits in the last column and the new tokens of all rows are
written to the same cache slot at each step.

The work is split so that nothing is done twice:

1. **Prefill** ``[B, P]`` prompt tokens once into a cache of ``P + max_new_tokens``
   slots, keeping only the last position's logits (never ``[B, P, V]``).
2. **Broadcast** the cache and those logits ``n`` times (row ``i*n + j`` is sample
   ``j`` of prompt ``i``) — one prefill per prompt, not ``n``.
3. **Decode** with ``jax.lax.while_loop``: feed the last token, get ``[B*n, V]``
   logits, filter, sample. The loop stops when every row has produced an EOS
   token or ``max_new_tokens`` are reached. With ``shrink_batch`` (on by default on
   the CPU) the loop is a chain of loops over halving row counts: once at most half
   of the rows still run, they are gathered (with their caches) into a batch half
   the size, so the rows that ended stop costing a step. Each row draws from its
   own key (:func:`sample_keys`), so the samples do not change. The cache is part of
   the loop carry, one buffer per layer (:class:`DecodeCache`), so each step's
   ``dynamic_update_slice`` of one slot happens in place instead of rewriting a
   stacked ``[L, B, K, S, Dh]`` cache.

Where a CPU decode step's time goes (SmolLM2-135M, batch 16): reading the float32
weights (~540 MB) bounds it near 20 ms; the per-layer buffers save a full cache
copy per step, and the two-level :func:`categorical` and :func:`argmax` replace a
Gumbel-max draw (V random numbers per row) and XLA's wide-row argmax, which each
cost several milliseconds per step on CPU. ``cache_dtype="bfloat16"`` halves the
cache's memory and traffic at a small cost in accuracy; it is meant for TPU/GPU
(on this CPU backend the conversions made a step about twice slower).

The logit filters (temperature, top-k, top-p, min-p) are pure functions on
``[B, V]`` logits, applied in that order (the order of Hugging Face's warpers).

Log-probabilities, when requested, are those of the *unmodified* model
distribution, ``log_softmax(raw logits)[token]``, not of the temperature-scaled,
filtered one that the token was drawn from. SPA's and PLE's judges do not use
them: they recompute log-probs with a forward pass (DESIGN.md §1).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxalign import parallel
from jaxalign.models.llama import (
    DTYPE_NAMES,
    KVCache,
    Transformer,
    dtype_from_name,
    init_cache,
    rope_frequencies,
    rope_tables,
)
from jaxalign.validation import (
    BOOLEAN,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_fields,
    list_of,
    number,
    one_of,
    optional,
)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode. Defaults are SPA's sampling settings (Kim et al. 2025, §4.1)
    except ``n``: SPA draws 2 responses per prompt.
    """

    max_new_tokens: int = 300  # SPA: at most 300 new tokens
    temperature: float = 0.7  # SPA: 0.7
    top_k: int = 0  # keep the k most likely tokens; 0 turns the filter off
    top_p: float = 1.0  # nucleus mass; SPA: 1.0 (off)
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 turns it off
    n: int = 1  # samples per prompt; SPA uses 2
    greedy: bool = False  # argmax of the raw logits; filters and temperature are ignored
    eos_token_ids: tuple[int, ...] = ()  # a row finishes after emitting any of these
    return_logprobs: bool = False  # log_softmax of the raw logits at each sampled token
    pad_token_id: int = 0  # written after a row has finished
    cache_dtype: str | None = None  # None: the model's activation dtype; "bfloat16" (TPU/GPU)
    # Halve the decoded rows whenever at most half of them are still running (down to
    # MIN_SHRUNK_ROWS); the samples are the same either way. None: on where the backend is
    # the CPU, whose step time grows with the rows; off on TPU/GPU, where it barely does.
    shrink_batch: bool | None = None

    def __post_init__(self):
        greedy = self.greedy is True
        check_fields(
            self,
            "sampling",
            {
                "max_new_tokens": POSITIVE_INT,
                # softmax(logits / T) needs T > 0; greedy ignores T, so 0 is fine there.
                "temperature": NON_NEGATIVE if greedy else POSITIVE,
                "top_k": NON_NEGATIVE_INT,  # 0: off
                "top_p": number(0, 1, low_open=True),  # a probability mass; 0 would keep nothing
                "min_p": number(0, 1),  # a fraction of the top probability; 0: off
                "n": POSITIVE_INT,
                "greedy": BOOLEAN,
                "eos_token_ids": list_of(NON_NEGATIVE_INT),  # empty: the tokenizer's
                "return_logprobs": BOOLEAN,
                "pad_token_id": NON_NEGATIVE_INT,
                "cache_dtype": optional(one_of(*DTYPE_NAMES)),
                "shrink_batch": optional(BOOLEAN),
            },
        )

    def replace(self, **changes) -> SamplingConfig:
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class Samples:
    """Decoded continuations; row ``i*n + j`` is sample ``j`` of prompt ``i``."""

    tokens: jax.Array  # [B*n, max_new_tokens] int32; pad_token_id after a row finished
    lengths: jax.Array  # [B*n] int32; generated tokens, the EOS token included
    finished: jax.Array  # [B*n] bool; an EOS token was produced
    logprobs: jax.Array | None = None  # [B*n, max_new_tokens] float32; 0 after the end
    row_steps: jax.Array | None = None  # [] int32: rows x steps decoded (the work done)


# ---------------------------------------------------------------------------
# Logit filters: pure functions on [B, V] float logits. A dropped token gets -inf.


def scale_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """``logits / T``: sampling from ``softmax(logits / T)``."""
    return logits / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps logits ``>=`` the k-th largest in each row (ties with it are kept too).

    ``logits [B, V]``; ``k`` in ``[1, V]``; ``k >= V`` keeps everything.
    """
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter (Holtzman et al. 2020): the smallest set of most likely tokens
    whose probability sums to ``>= p``.

    With probabilities sorted in descending order ``q_1 >= q_2 >= ...``, token ``j``
    is kept when the mass before it, ``q_1 + ... + q_{j-1}``, is ``< p``; so the top
    token is always kept. Tokens tied with the last kept one are kept as well, which
    makes the set independent of how a sort orders ties. ``logits [B, V]``.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1 since mass_before[0] = 0
    cutoff = jnp.take_along_axis(sorted_probs, kept - 1, axis=-1)
    return jnp.where(probs >= cutoff, logits, -jnp.inf)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """Min-p filter (Nguyen et al. 2024): keeps tokens with ``p >= min_p * p_max``.

    Computed in log space: ``logit >= max_logit + log(min_p)``. ``logits [B, V]``.
    """
    threshold = jnp.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, top-p and min-p — each only when it is switched on."""
    logits = scale_temperature(logits.astype(jnp.float32), config.temperature)
    if config.top_k > 0:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    if config.min_p > 0.0:
        logits = min_p_filter(logits, config.min_p)
    return logits


SAMPLING_BLOCK = 256  # vocabulary block of the two-level draws below


def _blocks(logits: jax.Array, block: int) -> jax.Array:
    """``[B, V] -> [B, ceil(V / block), block]``, padded with -inf."""
    rows, vocab = logits.shape
    pad = -vocab % block
    if pad:
        logits = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return logits.reshape(rows, -1, block)


def _first_above(cumulative: jax.Array, u: jax.Array) -> jax.Array:
    """Index of the first entry of each row's cumulative sums ``[B, N]`` exceeding
    ``u * total`` (``u [B, 1]`` in [0, 1)). The target is kept strictly below the
    total, so the chosen entry always has positive weight."""
    total = cumulative[:, -1:]
    target = jnp.minimum(u * total, jnp.nextafter(total, jnp.zeros_like(total)))
    return jnp.sum(cumulative <= target, axis=-1, dtype=jnp.int32)


def row_uniforms(keys: jax.Array, count: int) -> jax.Array:
    """``[B, count]`` uniform numbers in [0, 1): row ``b`` drawn from ``keys[b]`` alone, so a
    row's draw does not depend on which other rows share its batch. ``keys``: ``[B]`` keys,
    or one key (then row ``b`` uses ``fold_in(key, b)``)."""
    if keys.ndim == 0:
        raise ValueError("row_uniforms needs one key per row; see per_row_keys")
    return jax.vmap(lambda k: jax.random.uniform(k, (count,)))(keys)


def per_row_keys(key: jax.Array, rows: int) -> jax.Array:
    """``[rows]`` keys: ``key`` itself when it already holds one key per row, else
    ``fold_in(key, b)`` for row ``b``."""
    if key.ndim == 1:
        if key.shape[0] != rows:
            raise ValueError(f"{key.shape[0]} keys for {rows} rows")
        return key
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(rows))


def categorical(key: jax.Array, logits: jax.Array, block: int = SAMPLING_BLOCK) -> jax.Array:
    """An exact draw from ``softmax(logits)`` per row, ``[B, V] -> [B] int32``.

    Inverse-CDF sampling in two levels: pick a block of ``block`` tokens with
    probability proportional to its mass, then a token inside it. ``P(token) =
    P(block) * P(token | block) = softmax(logits)[token]``. It costs one ``exp`` over
    the vocabulary and two short cumulative sums, and needs two random numbers per
    row; Gumbel-max (``jax.random.categorical``) needs ``V`` of them, which on CPU
    costs more than the 49152-wide output layer's share of a SmolLM2 decode step.
    ``key``: one key per row ``[B]`` (row ``b``'s draw depends on ``key[b]`` and its own
    logits only), or a single key (see :func:`per_row_keys`).
    """
    grouped = _blocks(logits.astype(jnp.float32), block)
    weights = jnp.exp(grouped - jnp.max(grouped, axis=(1, 2), keepdims=True))
    u = row_uniforms(per_row_keys(key, logits.shape[0]), 2)
    block_index = _first_above(jnp.cumsum(jnp.sum(weights, axis=-1), axis=-1), u[:, :1])
    inside = jnp.take_along_axis(weights, block_index[:, None, None], axis=1)[:, 0]
    token_index = _first_above(jnp.cumsum(inside, axis=-1), u[:, 1:])
    return block_index * block + token_index


def argmax(logits: jax.Array, block: int = SAMPLING_BLOCK) -> jax.Array:
    """``jnp.argmax(logits, -1)`` (first index on ties), ``[B, V] -> [B] int32``,
    as a block maximum then an argmax within the block: XLA's CPU argmax over a
    wide row is several times slower than this."""
    grouped = _blocks(logits, block)
    block_index = jnp.argmax(jnp.max(grouped, axis=-1), axis=-1).astype(jnp.int32)
    inside = jnp.take_along_axis(grouped, block_index[:, None, None], axis=1)[:, 0]
    return block_index * block + jnp.argmax(inside, axis=-1).astype(jnp.int32)


def sample_tokens(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row from ``[B, V]`` raw logits: argmax when greedy, otherwise a
    draw from ``softmax(filter_logits(logits))``. Returns ``[B] int32``. ``key``: one key
    per row, or a single key (:func:`categorical`)."""
    if config.greedy:
        return argmax(logits)
    return categorical(key, filter_logits(logits, config))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[b, tokens[b]]`` of the raw logits: ``[B, V], [B] -> [B]``."""
    logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked.astype(jnp.float32) - logz


# ---------------------------------------------------------------------------
# The decode loop.

_TRACES = {"generate": 0}


def trace_count() -> int:
    """How many times the decode program has been traced (one per new compile),
    so tests and reports can check that same-shaped batches reuse one program."""
    return _TRACES["generate"]


def _repeat_rows(cache: KVCache, n: int) -> KVCache:
    """Row ``i`` of the cache becomes rows ``i*n ... i*n + n-1``."""
    if n == 1:
        return cache
    return KVCache(
        k=jnp.repeat(cache.k, n, axis=1),
        v=jnp.repeat(cache.v, n, axis=1),
        mask=jnp.repeat(cache.mask, n, axis=0),
        index=cache.index,
    )


def prefill(
    model: Transformer,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    cache_length: int,
    cache_dtype=None,
) -> tuple[jax.Array, KVCache]:
    """Runs left-padded prompts ``[B, P]`` into a fresh cache of ``cache_length`` slots.

    Returns the float32 logits of each row's last prompt token ``[B, V]`` (only that
    position goes through the output layer) and the cache, with ``index == P``.
    """
    prompt_mask = prompt_mask.astype(bool)
    cache = init_cache(model.config, prompt_ids.shape[0], cache_length, cache_dtype)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1, dtype=jnp.int32) - 1, 0)
    hidden, cache = model.hidden_states(prompt_ids, positions, prompt_mask, cache)
    return model.logits(hidden[:, -1]), cache


@flax.struct.dataclass
class DecodeCache:
    """The KV cache as the decode loop carries it: one buffer per layer.

    ``KVCache`` stacks layers on a leading axis, and a layer scan over it writes a
    whole new stack every step. With one loop-carried buffer per layer, each step's
    ``dynamic_update_slice`` of the new slot happens in place.
    """

    k: tuple[jax.Array, ...]  # L x [B, K, S, Dh]
    v: tuple[jax.Array, ...]  # L x [B, K, S, Dh]
    mask: jax.Array  # [B, S] bool: slot holds a real token
    index: jax.Array  # [] int32: the next slot to write

    def take_rows(self, rows: jax.Array) -> DecodeCache:
        """The cache of the batch rows ``rows [R]`` (in that order)."""
        return DecodeCache(
            k=tuple(x[rows] for x in self.k),
            v=tuple(x[rows] for x in self.v),
            mask=self.mask[rows],
            index=self.index,
        )

    @classmethod
    def from_kv_cache(cls, cache: KVCache) -> DecodeCache:
        layers = range(cache.k.shape[0])
        return cls(
            k=tuple(cache.k[i] for i in layers),
            v=tuple(cache.v[i] for i in layers),
            mask=cache.mask,
            index=cache.index,
        )


def layer_weights(model: Transformer) -> tuple[nnx.State, ...]:
    """Each layer's parameters as its own arrays, sliced once from the stacked state.

    Inside the decode loop a slice of the stacked parameters is a copy of that
    layer's weights on every step; sliced before the loop, the copies are made once."""
    _, stacked = nnx.split(model.layers)
    layers = range(model.config.num_layers)
    return tuple(jax.tree.map(lambda p, i=i: p[i], stacked) for i in layers)


def decode_step(
    model: Transformer,
    cache: DecodeCache,
    tokens: jax.Array,
    positions: jax.Array,
    layers: tuple[nnx.State, ...] | None = None,
) -> tuple[jax.Array, DecodeCache]:
    """Feeds one token per row, ``tokens [B]`` at ``positions [B]``, written at slot
    ``cache.index``. Returns the next-token logits ``[B, V]`` float32 and the cache.

    The same computation as ``model(tokens[:, None], positions[:, None], ones, cache)``
    (the model's own layers are called), with the layers unrolled over the per-layer
    buffers of :class:`DecodeCache` instead of scanned over a stacked cache.
    ``layers``: :func:`layer_weights` of the model, computed once outside a loop.
    """
    config = model.config
    index = cache.index
    mask = jax.lax.dynamic_update_slice(
        cache.mask, jnp.ones((tokens.shape[0], 1), bool), (0, index)
    )
    visible = jnp.arange(mask.shape[1]) <= index
    key_mask = (mask & visible)[:, None, :]  # [B, 1, S]
    rope = rope_tables(positions[:, None], rope_frequencies(config))
    x = jnp.take(model.embed_tokens[...], tokens[:, None], axis=0)
    x = x.astype(dtype_from_name(config.dtype))
    graphdef = nnx.graphdef(model.layers)
    layers = layer_weights(model) if layers is None else layers
    new_k, new_v = [], []
    for i, params in enumerate(layers):
        layer = nnx.merge(graphdef, params)
        x, (k, v) = layer(x, rope, key_mask, (cache.k[i], cache.v[i]), index)
        new_k.append(k)
        new_v.append(v)
    logits = model.logits(model.norm(x[:, 0]))
    return logits, DecodeCache(k=tuple(new_k), v=tuple(new_v), mask=mask, index=index + 1)


def _decode(
    model: Transformer,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    config: SamplingConfig,
) -> Samples:
    """The traced body of :func:`generate` (see the module docstring)."""
    _TRACES["generate"] += 1
    batch, prompt_len = prompt_ids.shape
    n, max_new = config.n, config.max_new_tokens
    rows = batch * n
    prompt_mask = prompt_mask.astype(bool)
    cache_dtype = dtype_from_name(config.cache_dtype or model.config.dtype)

    logits, cache = prefill(model, prompt_ids, prompt_mask, prompt_len + max_new, cache_dtype)
    lengths_in = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
    cache = DecodeCache.from_kv_cache(_repeat_rows(cache, n))
    logits = jnp.repeat(logits, n, axis=0)
    next_position = jnp.repeat(lengths_in, n)  # position of generated token 0
    eos = jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)
    layers = layer_weights(model)
    row_keys = sample_keys(key, batch, n)  # [rows]: sample j of prompt i
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))

    def pick(logits, keys, step, finished):
        token = sample_tokens(logits, step_keys(keys, step), config)
        token = jnp.where(finished, config.pad_token_id, token)
        logprob = token_logprobs(logits, token) if config.return_logprobs else None
        return token, logprob

    tokens = jnp.full((rows, max_new), config.pad_token_id, jnp.int32)
    logprobs = jnp.zeros((rows, max_new), jnp.float32)
    not_done = jnp.zeros((rows,), bool)
    token, logprob = pick(logits, row_keys, 0, not_done)
    tokens = tokens.at[:, 0].set(token)
    if config.return_logprobs:
        logprobs = logprobs.at[:, 0].set(logprob)
    finished = jnp.isin(token, eos)
    lengths = jnp.ones((rows,), jnp.int32)

    def body(carry):
        step, live, out = carry
        # Feed the token sampled at step-1, at position prompt length + step-1.
        logits, cache = decode_step(
            model, live["cache"], live["token"], live["position"] + step - 1, layers
        )
        finished = live["finished"]
        token, logprob = pick(logits, live["keys"], step, finished)
        live_rows = token.shape[0]

        def write(table, column):  # column [live rows] into the output's rows at ``step``
            if live_rows == rows:  # not shrunk: the rows are in order, an in-place slice
                return jax.lax.dynamic_update_slice(table, column[:, None], (0, step))
            return table.at[live["row"], step].set(column)

        tokens = write(out["tokens"], token)
        logprobs = out["logprobs"]
        if config.return_logprobs:
            logprobs = write(logprobs, jnp.where(finished, 0.0, logprob))
        live = {
            **live,
            "cache": cache,
            "token": token,
            "lengths": live["lengths"] + (~finished).astype(jnp.int32),
            "finished": finished | jnp.isin(token, eos),
        }
        out = {"tokens": tokens, "logprobs": logprobs, "row_steps": out["row_steps"] + live_rows}
        return step + 1, live, out

    # ``live``: the rows being decoded (all of them, or after a shrink the ones still
    # running, padded with finished ones); ``row``: each one's row in the output.
    live = {
        "cache": cache,
        "token": token,
        "position": next_position,
        "keys": row_keys,
        "finished": finished,
        "lengths": lengths,
        "row": jnp.arange(rows),
    }
    out = {"tokens": tokens, "logprobs": logprobs, "row_steps": jnp.int32(rows)}
    done = {"finished": finished, "lengths": lengths}  # every row's, written after each loop
    sizes = shrink_sizes(rows, config.shrink_batch)
    step = jnp.int32(1)
    for smaller in (*sizes[1:], 0):  # each phase runs until at most ``smaller`` rows run

        def cond(carry, smaller=smaller):
            step, live = carry[0], carry[1]
            running = jnp.sum(~live["finished"], dtype=jnp.int32)
            return (step < max_new) & (running > smaller)

        step, live, out = jax.lax.while_loop(cond, body, (step, live, out))
        done = {name: value.at[live["row"]].set(live[name]) for name, value in done.items()}
        if smaller:
            # At most ``smaller`` rows still run: keep them (stable: running rows first).
            keep = jnp.argsort(live["finished"], stable=True)[:smaller]
            live = {
                name: value.take_rows(keep) if name == "cache" else value[keep]
                for name, value in live.items()
            }
    return Samples(
        tokens=out["tokens"],
        lengths=done["lengths"],
        finished=done["finished"],
        logprobs=out["logprobs"] if config.return_logprobs else None,
        row_steps=out["row_steps"],
    )


MIN_SHRUNK_ROWS = 8  # below this a CPU step costs about the same whatever the rows


def shrink_sizes(rows: int, shrink: bool | None) -> tuple[int, ...]:
    """The row counts the decode loop steps through: ``rows``, then halves while they stay
    whole and at least :data:`MIN_SHRUNK_ROWS`. ``shrink`` None: on when the default backend
    is the CPU."""
    if shrink is None:
        shrink = jax.default_backend() == "cpu"
    sizes = [rows]
    while shrink and sizes[-1] % 2 == 0 and sizes[-1] // 2 >= MIN_SHRUNK_ROWS:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def sample_keys(key: jax.Array, prompts: int, n: int) -> jax.Array:
    """The key of every decoded row, ``[prompts * n]``: row ``i*n + j`` (sample ``j`` of
    prompt ``i``) gets ``fold_in(k_i, j)``, where ``k_i = key[i]`` for a batch of per-prompt
    keys ``[prompts]`` and ``fold_in(key, i)`` for a single key. Step ``t`` of a row then
    draws from ``fold_in(row key, t)``, so a sample's text depends only on its own key."""
    prompt_keys = per_row_keys(key, prompts)
    samples = jnp.arange(n)
    rows = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(samples))(prompt_keys)
    return rows.reshape((prompts * n, *rows.shape[2:]))


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, config: SamplingConfig):
    """One jitted program per (model structure, config); jit caches per input shapes
    and shardings, so a run of same-bucket batches compiles once."""

    def run(state, prompt_ids, prompt_mask, key):
        return _decode(nnx.merge(graphdef, state), prompt_ids, prompt_mask, key, config)

    return jax.jit(run)


def _place_on_mesh(state, prompt_ids, prompt_mask, mesh: Mesh):
    """Splits the batch over the data axes; replicates parameters not already on ``mesh``."""
    shards = parallel.batch_divisor(mesh)
    if prompt_ids.shape[0] % shards:
        raise ValueError(
            f"the prompt batch ({prompt_ids.shape[0]} rows) must be a multiple of the "
            f"mesh's data-parallel size ({shards}); pad the batch or change the mesh"
        )
    replicated = parallel.replicated(mesh)

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    rows = parallel.batch_sharding(mesh)
    state = jax.tree.map(place, state)
    return state, jax.device_put(prompt_ids, rows), jax.device_put(prompt_mask, rows)


def _replicate_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """The key(s) on every device of ``mesh``, from a copy every process holds.

    Goes through host memory: a key committed to a local device cannot be moved onto a
    mesh that spans other processes' devices, but its data can.
    """
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key)
    placed = jax.device_put(data, parallel.replicated(mesh))
    return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(key)) if typed else placed


def generate(
    model: Transformer,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    config: SamplingConfig,
    *,
    mesh: Mesh | None = None,
) -> Samples:
    """Samples ``config.n`` continuations of each left-padded prompt.

    ``prompt_ids [B, P] int32`` and ``prompt_mask [B, P]`` (1 on real tokens) are
    left-padded. ``key`` is a PRNG key, or ``[B]`` keys, one per prompt: the output is a
    deterministic function of them, and with per-prompt keys a prompt's samples do not
    depend on the other prompts of the batch, their number or their order (see
    :func:`sample_keys`). Returns :class:`Samples` with ``B * n`` rows, sample ``j`` of
    prompt ``i`` at row ``i*n + j``. With a ``mesh`` (``jaxalign.parallel.make_mesh``) the rows
    are split over its ``data`` and ``fsdp`` axes (``B`` must divide evenly);
    parameters already placed on the mesh (``parallel.shard_model_state``) keep their
    sharding, others are replicated.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            "prompt_ids and prompt_mask must both be [batch, prompt_len]; got "
            f"{prompt_ids.shape} and {prompt_mask.shape}"
        )
    total = prompt_ids.shape[1] + config.max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_ids.shape[1]} + max_new_tokens {config.max_new_tokens} "
            f"exceeds the model's context of {model.config.max_position_embeddings} tokens; "
            "shorten the prompts or lower max_new_tokens"
        )
    if key.ndim not in (0, 1) or (key.ndim == 1 and key.shape[0] != prompt_ids.shape[0]):
        raise ValueError(
            f"key must be one PRNG key or one per prompt ([{prompt_ids.shape[0]}]), "
            f"got shape {key.shape}"
        )
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state, prompt_ids, prompt_mask = _place_on_mesh(state, prompt_ids, prompt_mask, mesh)
        key = _replicate_key(key, mesh)
    return _compiled(graphdef, config)(state, prompt_ids, prompt_mask, key)
