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

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses
from jaxalign.models.llama import project
from jaxalign.training import (
    chunk_logps_backward,
    compact_positions,
    map_sequence_chunks,
    masked_logps,
    next_token_targets,
    pair_count,
    sum_over_sequences,
    token_rows,
    unless_unscored,
)


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

    When a batch has more valid entries than the buffer holds, only its last ``capacity``
    remain, as if they had been appended one at a time.
    """
    capacity = buffer["margins"].shape[0]
    valid = valid.astype(bool)
    n = jnp.sum(valid.astype(jnp.int32))
    offsets = jnp.cumsum(valid.astype(jnp.int32)) - 1
    # Entries that later ones of the same batch would overwrite are dropped up front, so
    # no two writes share a slot (a scatter's order among duplicates is unspecified).
    kept = valid & (offsets >= n - capacity)
    slots = jnp.where(kept, (buffer["position"] + offsets) % capacity, capacity)  # capacity: drop
    new = buffer["margins"].at[slots].set(margins.astype(jnp.float32), mode="drop")
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


# ----------------------------------------------------------------------------- the SPA loss


def _extrapolated_forward(lam, vocab_major, hp, w, hr, w_ref, targets, mask):
    logits = project(hp, w, vocab_major)  # [B,c,V] float32
    ref_logits = project(hr, w_ref, vocab_major)
    policy, lse = masked_logps(logits, targets, mask)
    ref = masked_logps(ref_logits, targets, mask)[0]
    mixed = masked_logps(extrapolated_logits(logits, ref_logits, lam), targets, mask)[0]
    return (policy, ref, mixed), lse


def _extrapolated_forward_or_skip(lam, vocab_major, hp, w, hr, w_ref, targets, mask):
    def skip(*_):
        zeros = jnp.zeros(hp.shape[:2], jnp.float32)
        return (zeros, zeros, zeros), zeros

    forward = functools.partial(_extrapolated_forward, lam, vocab_major)
    return unless_unscored(mask, forward, skip, hp, w, hr, w_ref, targets, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunk_extrapolated_logps(lam, vocab_major, hp, w, hr, w_ref, targets, mask):
    """``log π``, ``log π_ref`` and ``log p̃`` of one chunk's masked tokens, per position
    (``[B,c]`` each, 0 where ``mask`` is 0).

    ``hp, hr [B,c,D]``: the policy's and the reference's final-norm states; ``w, w_ref``
    their output layers, ``[D,V]`` or, with ``vocab_major``, ``[V,D]``. The policy's
    logits are computed once for all three terms. Only ``log π`` has a gradient
    (:func:`jaxalign.training.chunk_logps`' backward, logits recomputed); ``log π_ref``
    and ``log p̃`` are constants of the step (SPA reads them to flag pairs, not to
    train), so their cotangents are dropped and the reference gets none. A chunk whose
    ``mask`` is all 0 computes nothing (:func:`jaxalign.training.unless_unscored`).
    """
    return _extrapolated_forward_or_skip(lam, vocab_major, hp, w, hr, w_ref, targets, mask)[0]


def _chunk_extrapolated_fwd(lam, vocab_major, hp, w, hr, w_ref, targets, mask):
    terms, lse = _extrapolated_forward_or_skip(lam, vocab_major, hp, w, hr, w_ref, targets, mask)
    return terms, (hp, w, targets, mask, lse)


def _chunk_extrapolated_bwd(lam, vocab_major, residuals, g):
    dh, dw, _, _ = chunk_logps_backward(vocab_major, residuals, g[0])
    return dh, dw, None, None, None, None


chunk_extrapolated_logps.defvjp(_chunk_extrapolated_fwd, _chunk_extrapolated_bwd)


def _extrapolated_token_terms(
    policy,
    reference,
    h_policy,
    h_ref,
    ids,
    loss_mask,
    lam: float,
    chunk_size: int,
    segments=None,
    num_sequences: int = 0,
):
    """Per-sequence sums of ``log π(y_t)``, ``log π_ref(y_t)`` and ``log p̃(y_t)`` over
    masked tokens: per row, or with ``segments`` (packed rows) per segment
    (:func:`jaxalign.training.sum_over_sequences`).

    Chunked over the sequence by :func:`jaxalign.training.map_sequence_chunks` after
    :func:`jaxalign.training.compact_positions`, as
    :func:`jaxalign.training.chunked_token_logps` is, so no ``[B,T,V]`` logits are held
    and none are computed past the longest row's response; only ``log π`` carries a
    gradient (:func:`chunk_extrapolated_logps`).
    """
    targets, mask = next_token_targets(ids, loss_mask, segments)
    w_policy, vocab_major = policy.output_layer()
    w_ref, ref_vocab_major = reference.output_layer()
    if ref_vocab_major != vocab_major:  # the reference is the policy's own architecture
        w_ref = w_ref.T
    w_ref = jax.lax.stop_gradient(w_ref)

    def chunk_terms(hp, hr, tgt, m):
        return chunk_extrapolated_logps(lam, vocab_major, hp, w_policy, hr, w_ref, tgt, m)

    extra = () if segments is None else (segments,)
    hp, hr, tgt, scored, *compacted = compact_positions(
        mask, h_policy, h_ref, targets, mask, *extra
    )
    per_chunk = map_sequence_chunks(chunk_terms, (hp, hr, tgt, scored), chunk_size)
    segments = compacted[0] if compacted else None
    return tuple(sum_over_sequences(x, segments, num_sequences) for x in per_chunk)


def spa_loss_fn(
    graphdef,
    *,
    beta: float,
    lam: float,
    quantile: float,
    alpha: float,
    flag_after_step: int,
    label_mode: str = "smooth",
    chunk_size: int = 256,
    refine: bool = True,
):
    """SPA's training loss for :func:`jaxalign.training.make_train_step`.

    The reference model (``π_{i-1}``) runs on the fly from the step's ``frozen``
    parameters: de-coupled noise detection needs its per-token logits, not only
    its summed log-probs. Per batch:

    1. ``log π``, ``log π_ref`` and the extrapolated ``log p̃`` of chosen and
       rejected (one forward pass of each model over ``[2B, T]``);
    2. ``m̃ = β·[(log p̃(c) − log π_ref(c)) − (log p̃(r) − log π_ref(r))]``;
    3. ``τ`` = the ``quantile`` of the margins in ``algo_state["margins"]``
       (earlier batches); pairs with ``m̃ < τ`` are flagged once
       ``step ≥ flag_after_step``;
    4. flagged pairs get smoothing ``α`` (or the ``label_mode`` option), and
       the loss is DPO with per-pair smoothing;
    5. this batch's margins enter the ring buffer.

    ``batch["p"] [B]`` (the judge's preference probability) is used by the
    ``soft`` and ``confidence`` label modes; it defaults to 1.

    ``graphdef=None``: ``frozen`` is the reference model itself rather than its
    parameters (LoRA, :func:`jaxalign.models.lora.lora_loss_fn` with ``reference=True``).
    """

    def loss_fn(model, batch, algo_state, step, rng, frozen=None):
        if frozen is None:
            raise ValueError("spa_loss_fn needs the reference parameters as train_step's `frozen`")

        if graphdef is None:
            reference = frozen
        else:
            reference = nnx.merge(graphdef, jax.lax.stop_gradient(frozen))
        b = pair_count(batch)
        ids, positions, attn, lmask, segments = token_rows(batch)
        h_policy, _ = model.hidden_states(ids, positions, attn, segment_ids=segments)
        h_ref, _ = reference.hidden_states(ids, positions, attn, segment_ids=segments)
        h_ref = jax.lax.stop_gradient(h_ref)
        logp, ref_logp, mixed_logp = _extrapolated_token_terms(
            model, reference, h_policy, h_ref, ids, lmask, lam, chunk_size, segments, 2 * b
        )
        weight, smoothing = batch["weight"], batch["smoothing"]
        valid = weight > 0
        metrics = {}
        if refine:
            margin = beta * ((mixed_logp[:b] - ref_logp[:b]) - (mixed_logp[b:] - ref_logp[b:]))
            threshold = buffer_quantile(algo_state, quantile)
            active = step >= flag_after_step
            z = flag_noisy_pairs(margin, threshold, active) * valid
            p = batch.get("p", jnp.ones_like(weight))
            smoothing, weight = refined_labels(z, p, smoothing, weight, alpha, label_mode)
            algo_state = push_margins(algo_state, margin, valid)
            n_valid = jnp.maximum(jnp.sum(valid), 1)
            metrics = {
                "spa/flagged_fraction": jnp.sum(z) / n_valid,
                "spa/threshold": jnp.where(jnp.isfinite(threshold), threshold, 0.0),
                "spa/extrapolated_margin": jnp.sum(margin * valid) / n_valid,
                "spa/flagging_active": active.astype(jnp.float32),
                # Per pair, for the round's refinement log (jaxalign.loop.pair_rows).
                "pairs/extrapolated_margin": margin,
                "pairs/flagged": z,
            }
        loss, aux = losses.dpo_sigmoid_loss(
            logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], weight, smoothing, beta=beta
        )
        return loss, ({**aux, **metrics}, algo_state)

    return loss_fn
