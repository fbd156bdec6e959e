"""SPA's self-refinement: de-coupled noise detection and label smoothing, as pure functions.

Kim et al., "Aligning Large Language Models with Self-generated Preference Data"
(arXiv 2406.04412), Sec. 4.2. While training on self-annotated pairs, each pair's
confidence is its implicit-reward margin measured with *extrapolated* logits

    h̃ = (1 + λ)·h_θ − λ·h_ref                                          (de-coupling)
    m̃ = β·[(log p̃(y_c|x) − log π_ref(y_c|x)) − (log p̃(y_r|x) − log π_ref(y_r|x))]

where ``p̃ = softmax(h̃)`` per token (λ = 1/2, 1/4, 1/8 in rounds 1, 2, 3).
Pairs whose margin falls below ``τ``, the running ``q``-quantile (q = 10%) of
recent margins kept in a ring buffer, are flagged ``z = 1`` and trained with
label smoothing α (0.1):

    L = −(1 − α·z)·log σ(βΔ) − α·z·log σ(−βΔ)

No pair is flagged during the first 20% of a round's steps, while the buffer
fills. The buffer lives in the train state (``TrainState.algo_state``), so the
step stays pure and the threshold survives a checkpoint and resume.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def extrapolated_logits(policy_logits: jax.Array, ref_logits: jax.Array, lam: float) -> jax.Array:
    """``h̃ = (1 + λ)·h_θ − λ·h_ref``: the policy moved further away from the reference."""
    return (1.0 + lam) * policy_logits - lam * ref_logits


def init_margin_buffer(capacity: int) -> dict[str, jax.Array]:
    """An empty ring buffer of ``capacity`` margins."""
    if capacity <= 0:
        raise ValueError(f"margin buffer capacity must be positive, got {capacity}")
    return {
        "margins": jnp.zeros((capacity,), jnp.float32),
        "count": jnp.zeros((), jnp.int32),  # entries filled so far (≤ capacity)
        "position": jnp.zeros((), jnp.int32),  # next slot to write
    }


def push_margins(buffer: dict, margins: jax.Array, valid: jax.Array) -> dict:
    """Appends the ``valid`` entries of ``margins [B]`` in order, overwriting the oldest.

    Requires ``B ≤ capacity`` (checked statically).
    """
    capacity = buffer["margins"].shape[0]
    if margins.shape[0] > capacity:
        raise ValueError(
            f"a batch of {margins.shape[0]} margins does not fit a buffer of {capacity}"
        )
    valid = valid.astype(bool)
    offsets = jnp.cumsum(valid.astype(jnp.int32)) - 1
    slots = jnp.where(valid, (buffer["position"] + offsets) % capacity, capacity)  # capacity: drop
    new = buffer["margins"].at[slots].set(margins.astype(jnp.float32), mode="drop")
    n = jnp.sum(valid.astype(jnp.int32))
    return {
        "margins": new,
        "count": jnp.minimum(buffer["count"] + n, capacity),
        "position": (buffer["position"] + n) % capacity,
    }


def buffer_quantile(buffer: dict, q: float) -> jax.Array:
    """The ``q``-quantile of the filled entries (numpy's default linear interpolation).

    Returns ``-inf`` for an empty buffer, so nothing is below it.
    """
    capacity = buffer["margins"].shape[0]
    filled = jnp.arange(capacity) < buffer["count"]
    ordered = jnp.sort(jnp.where(filled, buffer["margins"], jnp.inf))
    n = buffer["count"]
    pos = q * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = pos - lo
    value = ordered[lo] + frac * (ordered[hi] - ordered[lo])
    return jnp.where(n > 0, value, -jnp.inf)


def flag_noisy_pairs(margins: jax.Array, threshold: jax.Array, active: jax.Array) -> jax.Array:
    """``z [B]``: 1.0 where a pair's margin is below ``threshold`` and flagging is ``active``."""
    return jnp.where(active & (margins < threshold), 1.0, 0.0).astype(jnp.float32)


def refined_labels(
    z: jax.Array,
    p: jax.Array,
    base_smoothing: jax.Array,
    base_weight: jax.Array,
    alpha: float,
    mode: str,
) -> tuple[jax.Array, jax.Array]:
    """Per-pair ``(smoothing, weight)`` after self-refinement.

    ``mode="smooth"`` (the paper): flagged pairs get label smoothing α.
    Options beyond the paper: ``"drop"`` gives flagged pairs weight 0;
    ``"soft"`` uses the judged preference ``p`` as a soft label for flagged
    pairs (smoothing ``1 − p``); ``"confidence"`` weights every pair by
    ``|2p − 1|`` and smooths none.
    """
    if mode == "smooth":
        return jnp.maximum(base_smoothing, alpha * z), base_weight
    if mode == "drop":
        return base_smoothing, base_weight * (1.0 - z)
    if mode == "soft":
        return jnp.where(z > 0, 1.0 - p, base_smoothing), base_weight
    if mode == "confidence":
        return base_smoothing, base_weight * jnp.abs(2.0 * p - 1.0)
    raise ValueError(f"unknown label mode {mode!r}; expected smooth, drop, soft or confidence")
