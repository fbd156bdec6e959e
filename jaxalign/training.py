"""The pure, jit-compiled, sharded training step and what it needs.

The pair batch
--------------
Every trainer in jaxalign (DPO, SPA, PLE) consumes the same *pair batch*: a
dict of arrays with fixed shapes per length bucket. Each sequence is the prompt
followed by the response, RIGHT-padded, starting at column 0:

- ``chosen_ids, rejected_ids [B,T] int32``;
- ``chosen_attention_mask, rejected_attention_mask [B,T]``: 1 on prompt and
  response tokens, 0 on padding;
- ``chosen_loss_mask, rejected_loss_mask [B,T]``: 1 on response tokens only,
  the tokens whose log-probs are summed; token ``t`` is predicted by the logits
  at position ``t-1``;
- ``weight [B] f32``: multiplies the pair's loss; 0 marks a padding pair;
- ``smoothing [B] f32``: the pair's label smoothing ``α_i``;
- optional ``ref_chosen_logps, ref_rejected_logps [B] f32``: reference
  log-probs precomputed by :func:`compute_reference_logps`.

The same batch may come *packed* (:mod:`jaxalign.data.packing`, what the train loop
feeds with ``train.pack_sequences``): ``packed_ids, packed_positions, packed_segments,
packed_loss_mask [R,T]`` in place of the chosen/rejected ids and masks, several
sequences per row, ``packed_segments`` naming each position's sequence (pair ``i``'s
chosen ``i``, its rejected ``B + i``, -1 on padding). Losses read either layout through
:func:`token_rows` and get the same ``[B]`` log-probs.

Losses reduce as ``sum(w·ℓ) / max(sum(w), ε)``. Reward-weighted SFT examples
(PLE) use the same sequence layout under an ``sft_`` prefix, in the same dict
or alone: ``sft_ids, sft_attention_mask, sft_loss_mask [B2,T]`` and
``sft_weight [B2]`` (see :func:`sft_loss_fn`). :mod:`jaxalign.data.pairs`
builds these batches from text.

The step
--------
``state, metrics = train_step(state, batch)`` (or ``train_step(state, batch,
frozen)``) is built by :func:`make_train_step` as one ``jax.jit`` with explicit
shardings and the state donated. Features enter as functions, not branches: a
*loss function*

    loss_fn(model, batch, algo_state, step, rng, frozen) -> (loss, (metrics, new_algo_state))

gets the policy as a live NNX module (``nnx.merge(graphdef, params)``), so it
may run ``model.hidden_states`` itself; ``algo_state`` is the algorithm's own
pytree carried in :class:`TrainState` (SPA's margin ring buffer); ``frozen`` is
an optional, non-differentiated, non-donated pytree passed to ``train_step``
as its third argument (an on-the-fly reference model's parameters), or
``None``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import losses
from jaxalign.models.llama import (
    DTYPE_NAMES,
    REMAT_POLICIES,
    ModelConfig,
    Transformer,
    dense,
    positions_from_mask,
    project,
)
from jaxalign.parallel import (
    BATCH_AXES,
    batch_divisor,
    batch_sharding,
    model_shardings,
    place_params,
    replicated,
)
from jaxalign.validation import (
    BOOLEAN,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Rule,
    check_fields,
    number,
    one_of,
    optional,
    require,
)

PAIR_FIELDS = (
    "chosen_ids",
    "rejected_ids",
    "chosen_attention_mask",
    "rejected_attention_mask",
    "chosen_loss_mask",
    "rejected_loss_mask",
    "weight",
    "smoothing",
)
REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
SFT_FIELDS = ("sft_ids", "sft_attention_mask", "sft_loss_mask", "sft_weight")
# A pair batch's sequences packed into rows (jaxalign.data.packing), in place of the
# chosen_/rejected_ ids and masks.
PACKED_FIELDS = ("packed_ids", "packed_positions", "packed_segments", "packed_loss_mask")
# Every field a train step may read: pairs, their reference log-probs, SFT rows, and the
# judge's preference probability ``p [B]`` (read by SPA's soft and confidence label modes).
BATCH_FIELDS = (*PAIR_FIELDS, *PACKED_FIELDS, *REFERENCE_FIELDS, *SFT_FIELDS, "p")

LOSS_NAMES = (*losses.PREFERENCE_LOSSES, "ranking")

# Loss metrics under this prefix are per pair ([B], one value per batch row), not scalars:
# the train loop logs them per pair (with the batch's record index) instead of averaging.
PER_PAIR_PREFIX = "pairs/"


def is_per_pair(name: str) -> bool:
    return name.startswith(PER_PAIR_PREFIX)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters (defaults: SPA, Kim et al. 2024, App. B)."""

    learning_rate: float = 5e-7  # SPA and Zephyr's DPO recipe
    warmup_ratio: float = 0.1  # SPA: 10% linear warm-up
    schedule: str = "cosine"  # SPA: cosine decay to 0; also "linear", "constant"
    weight_decay: float = 0.0  # alignment-handbook DPO recipe (SPA builds on it): no decay
    adam_b1: float = 0.9  # AdamW (Loshchilov & Hutter 2019) / torch defaults, used by TRL
    adam_b2: float = 0.999  # torch AdamW default
    adam_eps: float = 1e-8  # torch AdamW default
    max_grad_norm: float = 1.0  # HF Trainer default (TRL's DPOTrainer inherits it)
    batch_size: int = 32  # SPA: global batch of 32 pairs
    micro_batches: int = 1  # gradient accumulation steps inside one train step
    beta: float = 0.1  # SPA / DPO: KL strength β
    loss: str = "sigmoid"  # DPO (Rafailov et al. 2023); ipo | hinge | robust | ranking
    ranking_margin: float = 0.0  # RRHF's ranking loss has no margin
    epochs: int = 3  # SPA round 0: 3 epochs on the seed pairs (later rounds: 1)
    logp_chunk_size: int = 256  # sequence positions per log-softmax chunk (memory bound)
    # None keeps the model's own dtype; "bfloat16": bfloat16 compute with float32 master
    # weights (the parameters stay in their param_dtype, each matmul casts them).
    compute_dtype: str | None = None
    # What the backward pass recomputes (ModelConfig.remat): "dots" keeps the weight
    # matmuls' outputs and recomputes attention scores, softmax and element-wise ops
    # (measured faster than storing everything on CPU, and far smaller); true/"full"
    # recomputes whole layers; false/"none" stores all; null keeps the model's setting.
    remat: bool | str | None = "dots"
    # Pack each pair batch's sequences into fewer rows (jaxalign.data.packing): the same
    # step on less padding; and the reference's and the judge's log-prob passes
    # (jaxalign.scoring) pack all their sequences at once. Rows of the longest bucket T,
    # or 2T / 4T in half / a quarter of the rows, whichever computes fewer FLOPs. Applied
    # on a one-device mesh (the CPU runs), for the step with micro_batches 1; several
    # devices, micro-batches and host-local batches run unpacked.
    pack_sequences: bool = True
    seed: int = 0

    def __post_init__(self):
        check_fields(
            self,
            "train",
            {
                "learning_rate": POSITIVE,  # the AdamW step size; 0 trains nothing
                "warmup_ratio": number(0, 1),  # a share of the run's steps
                "schedule": one_of("cosine", "linear", "constant"),
                "weight_decay": NON_NEGATIVE,  # decoupled decay; negative grows the weights
                # Adam's bias correction divides by 1 - b^t, which b = 1 makes 0.
                "adam_b1": number(0, 1, high_open=True),
                "adam_b2": number(0, 1, high_open=True),
                "adam_eps": POSITIVE,  # keeps the update finite where the second moment is 0
                "max_grad_norm": POSITIVE,  # clipping to a norm of 0 zeroes every gradient
                "batch_size": POSITIVE_INT,
                "micro_batches": POSITIVE_INT,
                "beta": POSITIVE,  # the KL strength β scales the log-ratio; IPO divides by it
                "loss": one_of(*LOSS_NAMES),
                # RRHF's hinge max(0, m - d): m < 0 would accept the rejected response ranked
                # above the chosen one by up to |m|.
                "ranking_margin": NON_NEGATIVE,
                "epochs": POSITIVE_INT,
                "logp_chunk_size": POSITIVE_INT,
                "compute_dtype": optional(one_of(*DTYPE_NAMES)),
                "remat": Rule(
                    lambda v: v is None or isinstance(v, bool) or v in REMAT_POLICIES,
                    f"null, true, false or one of {', '.join(REMAT_POLICIES)}",
                ),
                "pack_sequences": BOOLEAN,
                "seed": SEED,
            },
        )
        require(
            self.batch_size % self.micro_batches == 0,
            f"train.batch_size must be a multiple of train.micro_batches "
            f"({self.micro_batches}), got {self.batch_size}",
        )


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (a pytree)."""

    step: jax.Array  # [] int32: train steps taken, skipped ones included
    params: nnx.State  # the policy's parameters
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32 PRNG key, split once per step
    algo_state: dict  # algorithm state (SPA's margin ring buffer); {} by default
    skipped_steps: jax.Array  # [] int32: steps whose update was dropped (non-finite)


LossFn = Callable[..., tuple[jax.Array, tuple[dict, dict]]]


# ----------------------------------------------------------------------------- log-probs


def logsumexp(logits: jax.Array) -> jax.Array:
    """``logsumexp`` over the last axis.

    On XLA:CPU the sum of exponentials is a matmul by a ones vector: XLA:CPU fuses
    ``sum(exp(x))`` into one scalar loop that runs at about half the speed of the
    vectorised ``exp`` plus a matmul (measured over a ``[16, 64, 49152]`` chunk: 64 ms
    vs 98 ms). Elsewhere it is a plain reduction: a TPU's or GPU's default matmul
    precision would round the float32 terms (bfloat16 passes, TF32) for no gain there.
    The backend is the one the program is traced for (``jax.default_backend()``)."""
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = jnp.exp(logits - peak)
    if jax.default_backend() == "cpu":
        total = shifted @ jnp.ones((logits.shape[-1],), logits.dtype)
    else:
        total = jnp.sum(shifted, axis=-1)
    return jnp.log(total) + peak[..., 0]


def masked_logps(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """``(mask_t · log softmax(logits_t)[targets_t] [B,c], lse [B,c])`` of a chunk's
    ``[B,c,V]`` logits; the log-normaliser is what :func:`chunk_logps`' backward reuses."""
    lse = logsumexp(logits)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (picked - lse) * mask, lse


def _chunk_forward(vocab_major, h, w, targets, mask):
    return masked_logps(project(h, w, vocab_major), targets, mask)  # [B,c,V] float32


# Chunks with no scored position are skipped only where the process has at most this many
# devices. A ``lax.cond`` whose branches hold collectives (a sharded output layer's
# all-gathers and reductions) deadlocked on XLA:CPU: 8 devices, the program loaded from the
# persistent compilation cache, devices waiting in different collectives. With more devices
# every chunk is computed, as before the skip existed.
SKIP_MAX_DEVICES = 1


def unless_unscored(mask: jax.Array, compute: Callable, skip: Callable, *operands):
    """``compute(*operands)``, or ``skip(*operands)`` (zeros of the same shapes) when the
    chunk's ``mask`` is all 0; the choice is a ``lax.cond``, made only in a process with
    at most :data:`SKIP_MAX_DEVICES` devices (elsewhere ``compute`` always runs)."""
    if jax.device_count() > SKIP_MAX_DEVICES:
        return compute(*operands)
    return jax.lax.cond(jnp.any(mask != 0), compute, skip, *operands)


def _chunk_forward_or_skip(vocab_major, h, w, targets, mask):
    def skip(h, *_):
        return jnp.zeros(h.shape[:2], jnp.float32), jnp.zeros(h.shape[:2], jnp.float32)

    forward = functools.partial(_chunk_forward, vocab_major)
    return unless_unscored(mask, forward, skip, h, w, targets, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunk_logps(
    h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array, vocab_major: bool = False
) -> jax.Array:
    """``mask_t · log softmax(h_t W)[targets_t]`` per position, ``[B,c]``; ``h [B,c,D]``,
    ``w [D,V]`` (or ``[V,D]`` with ``vocab_major``, as :meth:`Transformer.output_layer`
    gives it). Callers sum the positions of each sequence (:func:`sum_over_sequences`).

    The backward pass recomputes the ``[B,c,V]`` logits from ``h`` (they are never
    stored) and reuses the forward's log-normaliser: ``∂/∂logits = g·mask·(onehot −
    exp(logits − lse))``, then one matmul each for ``∂h`` and ``∂W``. A chunk whose
    ``mask`` is all 0 computes nothing in either pass (its rows score 0, its gradients
    are 0; :func:`unless_unscored`): with :func:`compact_positions` that is every chunk
    past the longest row's scored positions."""
    return _chunk_forward_or_skip(vocab_major, h, w, targets, mask)[0]


def _chunk_logps_fwd(h, w, targets, mask, vocab_major=False):
    out, lse = _chunk_forward_or_skip(vocab_major, h, w, targets, mask)
    return out, (h, w, targets, mask, lse)


def _chunk_backward(vocab_major, h, w, targets, mask, lse, g):
    logits = project(h, w, vocab_major)
    coef = (mask * g)[..., None]  # [B,c,1]
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    onehot = vocab == targets[..., None]
    dlogits = (jnp.where(onehot, coef, 0.0) - coef * jnp.exp(logits - lse[..., None])).astype(
        h.dtype
    )
    wc = w.astype(h.dtype)
    flat_h = h.reshape(-1, h.shape[-1])
    flat_d = dlogits.reshape(-1, dlogits.shape[-1])
    if vocab_major:  # w [V,D]: ∂h = ∂logits·W, ∂W = ∂logitsᵀ·h
        dh = dense(dlogits, wc, preferred_element_type=jnp.float32)
        dw = jnp.matmul(flat_d.T, flat_h, preferred_element_type=jnp.float32)
    else:  # w [D,V]: ∂h = ∂logits·Wᵀ, ∂W = hᵀ·∂logits
        dh = dense(dlogits, wc.T, preferred_element_type=jnp.float32)
        dw = jnp.matmul(flat_h.T, flat_d, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype)


def chunk_logps_backward(vocab_major, residuals, g):
    """:func:`chunk_logps`' backward pass: ``residuals = (h, w, targets, mask, lse)``."""
    h, w, targets, mask, lse = residuals

    def skip(h, w, *_):
        return jnp.zeros_like(h), jnp.zeros_like(w)

    backward = functools.partial(_chunk_backward, vocab_major)
    dh, dw = unless_unscored(mask, backward, skip, h, w, targets, mask, lse, g)
    return dh, dw, None, None


chunk_logps.defvjp(_chunk_logps_fwd, chunk_logps_backward)


def next_token_targets(
    ids: jax.Array, loss_mask: jax.Array, segments: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(targets, mask)`` ``[B,T]`` aligned with the logits: position ``t`` predicts token
    ``t+1``, so ``targets[:, t] = ids[:, t+1]`` and ``mask[:, t] = loss_mask[:, t+1]``
    (float32; the last position predicts nothing). With ``segments [B,T]`` (packed rows)
    a position predicts nothing across a boundary: the last token of one sequence does
    not score the first of the next."""
    b = ids.shape[0]
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros((b, 1), loss_mask.dtype)], axis=1)
    mask = mask.astype(jnp.float32)
    if segments is not None:
        same = jnp.concatenate(
            [segments[:, 1:] == segments[:, :-1], jnp.zeros((b, 1), bool)], axis=1
        )
        mask = mask * same
    return targets, mask


def map_sequence_chunks(fn: Callable, arrays: tuple[jax.Array, ...], chunk_size: int):
    """``fn`` applied to the sequence in chunks of ``chunk_size`` positions, one at a time.

    ``arrays``: ``[B,T,...]`` each, cut along ``T`` (zero-padded to a multiple of the
    chunk); ``fn(*chunk)`` gets each one's ``[B,c,...]`` piece. A ``lax.map`` runs the
    chunks in sequence, so whatever ``fn`` builds (e.g. ``[B,c,V]`` logits) exists for
    one chunk at a time. Returns ``fn``'s outputs stacked over chunks, ``[n, ...]``.
    """
    b, t = arrays[0].shape[:2]
    size = min(chunk_size, t)
    n = -(-t // size)
    pad = n * size - t

    def to_chunks(x):
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(b, n, size, *x.shape[2:]), 0, 1)

    return jax.lax.map(lambda chunk: fn(*chunk), tuple(to_chunks(x) for x in arrays))


@jax.custom_vjp
def _take_positions(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, order[..., None], axis=1)


def _take_positions_fwd(x, order, inverse):
    return _take_positions(x, order, inverse), (order, inverse)


def _take_positions_bwd(residuals, g):
    # A permutation's transpose is the inverse permutation: a gather, where autodiff of
    # take_along_axis would build a scatter-add.
    order, inverse = residuals
    return jnp.take_along_axis(g, inverse[..., None], axis=1), None, None


_take_positions.defvjp(_take_positions_fwd, _take_positions_bwd)


def compact_positions(mask: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` with each row's masked positions moved to its front, in order.

    ``mask [B,T]``; ``arrays``: ``[B,T]`` or ``[B,T,D]`` each (``mask`` is usually one
    of them), permuted the same way per row. Past the longest row's count of masked
    positions every row then holds only unmasked ones, so a chunk there has an all-0 mask
    and :func:`chunk_logps` skips it (on one device, :func:`unless_unscored`): a log-prob
    needs the output layer only where the loss mask is set — not on prompts or padding —
    and the output layer is a quarter of a small model's matmuls. Rows stay rows, so a
    batch sharded on its first axis needs no communication. Differentiable in the
    ``[B,T,D]`` arrays (the backward pass applies the inverse permutation).
    """
    order = jnp.argsort(mask == 0, axis=1, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order, axis=1).astype(jnp.int32)

    def take(x):
        if x.ndim == 3:
            return _take_positions(x, order, inverse)
        return jnp.take_along_axis(x, order, axis=1)

    return tuple(take(x) for x in arrays)


def sum_over_sequences(
    per_chunk: jax.Array, segments: jax.Array | None = None, num_sequences: int = 0
) -> jax.Array:
    """Per-sequence sums of per-position values chunked by :func:`map_sequence_chunks`.

    ``per_chunk [n,B,c]``. Without ``segments`` each row is one sequence: ``[B]``. With
    ``segments [B,T]`` (packed rows, in the same position order as the values; -1 on
    padding, whose values are 0) the sum of each segment's positions: ``[num_sequences]``.
    """
    if segments is None:
        return jnp.sum(per_chunk, axis=(0, 2))
    n, b, c = per_chunk.shape
    values = jnp.swapaxes(per_chunk, 0, 1).reshape(b, n * c)[:, : segments.shape[1]]
    ids = jnp.maximum(segments, 0).reshape(-1)
    return jax.ops.segment_sum(values.reshape(-1), ids, num_segments=num_sequences)


def chunked_token_logps(
    model: Transformer,
    hidden: jax.Array,
    ids: jax.Array,
    loss_mask: jax.Array,
    chunk_size: int = 256,
    segments: jax.Array | None = None,
    num_sequences: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token log-probs of masked tokens, computed chunk by chunk.

    ``hidden [B,T,D]`` (final-norm states), ``ids, loss_mask [B,T]``. Token ``t``
    is scored by the logits at ``t-1``: ``Σ_t m_t · log softmax(W h_{t-1})[ids_t]``.
    Each row's masked positions are moved to its front (:func:`compact_positions`), so
    the output layer runs only on chunks that hold a scored token; the sequence is cut
    into chunks of ``chunk_size`` positions (:func:`map_sequence_chunks`); each chunk's
    ``[B,chunk,V]`` float32 logits live only inside one step of the map (recomputed in
    the backward pass, see :func:`chunk_logps`), so neither pass holds ``[B,T,V]``.
    Returns ``(sum_logps [B], num_tokens [B])``; for packed rows (``segments [B,T]``, see
    :func:`token_rows`) the sums per sequence, ``[num_sequences]`` each.
    """
    targets, mask = next_token_targets(ids, loss_mask, segments)
    w, vocab_major = model.output_layer()
    extra = () if segments is None else (segments,)
    hidden, targets, scored, *compacted = compact_positions(mask, hidden, targets, mask, *extra)
    per_chunk = map_sequence_chunks(
        lambda h, tgt, m: chunk_logps(h, w, tgt, m, vocab_major),
        (hidden, targets, scored),
        chunk_size,
    )
    if segments is None:
        return sum_over_sequences(per_chunk), jnp.sum(mask, axis=1)
    counts = jax.ops.segment_sum(
        mask.reshape(-1), jnp.maximum(segments, 0).reshape(-1), num_segments=num_sequences
    )
    return sum_over_sequences(per_chunk, compacted[0], num_sequences), counts


def sequence_logps(
    model: Transformer,
    ids: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """``log π(response | prompt)`` per row: ``(sum_logps [B], num_tokens [B])``.

    ``ids, attention_mask, loss_mask [B,T]``, right-padded (the pair-batch layout).
    """
    positions = positions_from_mask(attention_mask)
    hidden, _ = model.hidden_states(ids, positions, attention_mask)
    return chunked_token_logps(model, hidden, ids, loss_mask, chunk_size)


def pair_count(batch: Mapping[str, jax.Array]) -> int:
    """The pairs ``B`` of a pair batch, packed (its ``weight [B]``) or not."""
    return batch["weight" if "packed_ids" in batch else "chosen_ids"].shape[0]


def token_rows(batch: Mapping[str, jax.Array]):
    """``(ids, positions, attention_mask, loss_mask, segments)``: the rows a pair batch's
    forward pass runs over.

    Unpacked: ``[2B,T]``, the chosen rows then the rejected ones, ``segments`` None. Packed
    (:data:`PACKED_FIELDS`, :func:`jaxalign.data.packing.pack_pair_rows`): the ``[R,T]``
    rows, ``segments`` naming each position's sequence (pair ``i``'s chosen response is
    sequence ``i``, its rejected one ``B + i``; -1 on padding)."""
    if "packed_ids" in batch:
        segments = batch["packed_segments"]
        return (
            batch["packed_ids"],
            batch["packed_positions"],
            segments >= 0,
            batch["packed_loss_mask"],
            segments,
        )

    def both(name):
        return jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)

    attention_mask = both("attention_mask")
    positions = positions_from_mask(attention_mask)
    return both("ids"), positions, attention_mask, both("loss_mask"), None


def pair_logps(
    model: Transformer, batch: Mapping[str, jax.Array], chunk_size: int = 256
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Chosen and rejected log-probs from ONE forward pass over ``[2B,T]`` (or the
    batch's packed rows, :func:`token_rows`).

    Returns ``(chosen_logps, rejected_logps, chosen_num_tokens, rejected_num_tokens)``,
    each ``[B]``.
    """
    b = pair_count(batch)
    ids, positions, attention_mask, loss_mask, segments = token_rows(batch)
    hidden, _ = model.hidden_states(ids, positions, attention_mask, segment_ids=segments)
    logps, counts = chunked_token_logps(
        model, hidden, ids, loss_mask, chunk_size, segments, num_sequences=2 * b
    )
    return logps[:b], logps[b:], counts[:b], counts[b:]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size",))
def _reference_logps(graphdef, params, batch, chunk_size):
    model = nnx.merge(graphdef, params)
    chosen, rejected, _, _ = pair_logps(model, batch, chunk_size)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def compute_reference_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Mapping[str, Any],
    chunk_size: int = 256,
) -> dict[str, jax.Array]:
    """Reference log-probs ``{ref_chosen_logps, ref_rejected_logps}`` ``[B]`` for a pair batch.

    Run once per dataset (or round) with the reference parameters and stored with
    the pairs, so training holds only the policy. Jitted; compiles once per bucket.
    """
    fields = {k: batch[k] for k in PAIR_FIELDS if k.endswith(("ids", "mask"))}
    return _reference_logps(graphdef, params, fields, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- loss functions


def dpo_loss_fn(config: TrainConfig, graphdef: nnx.GraphDef | None = None) -> LossFn:
    """The standard pairwise loss function for :func:`make_train_step`.

    Uses ``config.loss`` from :mod:`jaxalign.losses`. The reference log-probs come
    from the batch (``ref_chosen_logps``/``ref_rejected_logps``) when present;
    otherwise from an on-the-fly reference whose parameters are the step's
    ``frozen`` argument (then ``graphdef`` must be given; gradients are stopped).
    ``loss="ranking"`` is reference-free.
    """
    chunk = config.logp_chunk_size

    def reference(batch, frozen):
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if frozen is None or graphdef is None:
            raise ValueError(
                "the batch has no ref_chosen_logps/ref_rejected_logps; precompute them with "
                "compute_reference_logps, or pass the reference parameters as train_step's "
                "`frozen` argument and build the loss with dpo_loss_fn(config, graphdef)"
            )
        ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(frozen))
        chosen, rejected, _, _ = pair_logps(ref_model, batch, chunk)
        return chosen, rejected

    if config.loss == "ranking":

        def loss_fn(model, batch, algo_state, step, rng, frozen=None):
            chosen, rejected, n_chosen, n_rejected = pair_logps(model, batch, chunk)
            loss, aux = losses.ranking_loss(
                chosen,
                rejected,
                n_chosen,
                n_rejected,
                batch["weight"],
                batch["smoothing"],
                margin=config.ranking_margin,
            )
            return loss, (aux, algo_state)

        return loss_fn

    preference_loss = losses.PREFERENCE_LOSSES[config.loss]

    def loss_fn(model, batch, algo_state, step, rng, frozen=None):
        chosen, rejected, _, _ = pair_logps(model, batch, chunk)
        ref_chosen, ref_rejected = reference(batch, frozen)
        loss, aux = preference_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            batch["weight"],
            batch["smoothing"],
            beta=config.beta,
        )
        return loss, (aux, algo_state)

    return loss_fn


def sft_loss_fn(config: TrainConfig) -> LossFn:
    """Reward-weighted SFT on the ``sft_*`` fields (:func:`jaxalign.losses.weighted_sft_loss`)."""

    def loss_fn(model, batch, algo_state, step, rng, frozen=None):
        logps, counts = sequence_logps(
            model,
            batch["sft_ids"],
            batch["sft_attention_mask"],
            batch["sft_loss_mask"],
            config.logp_chunk_size,
        )
        loss, aux = losses.weighted_sft_loss(logps, counts, batch["sft_weight"])
        return loss, (aux, algo_state)

    return loss_fn


# ----------------------------------------------------------------------------- optimizer/state


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per applied update: linear warm-up over ``warmup_ratio·total_steps``,
    then cosine or linear decay to 0 (HF ``get_cosine_schedule_with_warmup``), or constant."""
    total = max(int(total_steps), 1)
    warmup = int(config.warmup_ratio * total)
    peak = config.learning_rate
    if config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
    else:
        decay = optax.linear_schedule(peak, 0.0, max(total - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping to ``max_grad_norm``, then AdamW on :func:`make_schedule`."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            make_schedule(config, total_steps),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        ),
    )


def configure_model(model: Transformer, config: TrainConfig) -> Transformer:
    """A copy of ``model`` with ``config``'s compute dtype and remat applied (arrays shared).

    A trained module that is not a decoder (e.g. LoRA adapters, whose base model is
    configured by the loss function) is returned unchanged."""
    if not isinstance(getattr(model, "config", None), ModelConfig):
        return model
    changes = {}
    if config.compute_dtype is not None and config.compute_dtype != model.config.dtype:
        changes["dtype"] = config.compute_dtype
    if config.remat is not None and config.remat != model.config.remat:
        changes["remat"] = config.remat
    if not changes:
        return model
    new_config = model.config.replace(**changes)
    copy = nnx.merge(*nnx.split(model))
    for _, module in copy.iter_modules():
        if isinstance(getattr(module, "config", None), ModelConfig):
            module.config = new_config
    return copy


def compute_graphdef(graphdef: nnx.GraphDef, params, config: TrainConfig) -> nnx.GraphDef:
    """The structure of the model as training computes it (``config``'s compute dtype and
    remat, :func:`configure_model`), for passes that must match the policy: a reference
    whose margins are 0 where its weights are the policy's."""
    return nnx.split(configure_model(nnx.merge(graphdef, params), config))[0]


def state_shardings_for(
    state: TrainState, param_shardings: Any, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Shardings for a :class:`TrainState`: parameters (and Adam moments, which mirror
    them) by the logical-axis rules; counters, RNG and algorithm state replicated."""
    rep = replicated(mesh)
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state.opt_state,
        param_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=rep,
        params=param_shardings,
        opt_state=opt,
        rng=rep,
        algo_state=jax.tree.map(lambda _: rep, state.algo_state),
        skipped_steps=rep,
    )


def create_train_state(
    model: Transformer,
    config: TrainConfig,
    total_steps: int,
    mesh: Mesh,
    algo_state: dict | None = None,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Splits ``model`` and builds a sharded :class:`TrainState`.

    Returns ``(graphdef, state, shardings)``: ``graphdef`` carries the compute
    dtype and remat setting from ``config``; ``shardings`` is a ``TrainState`` of
    ``NamedSharding``s, for :func:`make_train_step` and checkpoint restores.
    """
    graphdef, params = nnx.split(configure_model(model, config))
    param_shardings = model_shardings(params, mesh)
    optimizer = make_optimizer(config, total_steps)
    algo_state = {} if algo_state is None else algo_state

    def init(params, algo_state):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.PRNGKey(config.seed),
            algo_state=algo_state,
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    abstract = jax.eval_shape(init, params, algo_state)
    shardings = state_shardings_for(abstract, param_shardings, optimizer, mesh)
    # Each device receives only its shards: host arrays handed to the jit directly would be
    # copied whole to every device first.
    params = place_params(params, mesh)
    state = jax.jit(init, out_shardings=shardings)(params, algo_state)
    return graphdef, state, shardings


# ----------------------------------------------------------------------------- the step


def _micro_batch_weight(batch: Mapping[str, jax.Array]) -> jax.Array:
    """The weight mass a micro-batch's loss is a mean over (``weight`` + ``sft_weight``)."""
    total = jnp.zeros((), jnp.float32)
    for name in ("weight", "sft_weight"):
        if name in batch:
            total = total + jnp.sum(batch[name].astype(jnp.float32))
    return total


def split_micro_batches(batch: Mapping[str, jax.Array], n: int, mesh: Mesh) -> dict:
    """``[B, ...] -> [n, B/n, ...]``; micro-batch ``i`` takes rows ``i, i+n, ...``.

    Interleaving keeps every micro-batch spread over all batch shards.
    """

    def split(name, x):
        rows = x.shape[0]
        if rows % (n * batch_divisor(mesh)):
            raise ValueError(
                f"batch field {name!r} has {rows} rows, not a multiple of micro_batches ({n}) x "
                f"the data x fsdp mesh size ({batch_divisor(mesh)})"
            )
        x = jnp.swapaxes(x.reshape(rows // n, n, *x.shape[1:]), 0, 1)
        spec = PartitionSpec(None, BATCH_AXES)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return {name: split(name, x) for name, x in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh,
    loss_fn: LossFn,
    state_shardings: TrainState,
    *,
    total_steps: int,
    frozen_shardings: Any = None,
):
    """Builds ``train_step(state, batch[, frozen]) -> (state, metrics)``, jitted with shardings.

    - ``loss_fn(model, batch, algo_state, step, rng, frozen)`` (see the module doc);
    - ``config.micro_batches`` > 1: gradients accumulate over a ``lax.scan`` of
      micro-batches (carrying ``algo_state``), each weighted by its share of the
      batch's weight mass, which equals one step on the whole batch for any loss
      that is a weighted mean;
    - the update is AdamW after global-norm clipping (:func:`make_optimizer`,
      with the same ``total_steps`` as :func:`create_train_state`);
    - a non-finite loss or gradient norm drops the update: params, optimizer
      state and algorithm state stay as they were; ``train/skipped`` is 1 and
      ``state.skipped_steps`` grows;
    - ``frozen_shardings``: give it (e.g. the reference params' shardings) to get
      a step with a third, non-donated ``frozen`` argument.

    Metrics: ``train/loss``, ``train/grad_norm`` (before clipping),
    ``train/learning_rate``, ``train/skipped``, ``train/skipped_total`` and the
    loss's own metrics. A loss metric named ``pairs/...`` is per pair (``[B]``, in the
    batch's row order, micro-batches or not) rather than a scalar; see
    :data:`PER_PAIR_PREFIX`.
    """
    optimizer = make_optimizer(config, total_steps)
    schedule = make_schedule(config, total_steps)
    n_micro = config.micro_batches

    def grads_of(params, batch, algo_state, step, rng, frozen):
        def objective(params):
            model = nnx.merge(graphdef, params)
            loss, (aux, new_algo) = loss_fn(model, batch, algo_state, step, rng, frozen)
            return loss, (aux, new_algo)

        (loss, (aux, new_algo)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return loss, aux, new_algo, grads

    def accumulate(state, batch, rng, frozen):
        micro = split_micro_batches(batch, n_micro, mesh)
        masses = jax.vmap(_micro_batch_weight)(micro)
        total = jnp.sum(masses)
        shares = jnp.where(total > 0, masses / jnp.maximum(total, losses.WEIGHT_EPS), 1.0 / n_micro)
        rngs = jax.random.split(rng, n_micro)
        first = jax.tree.map(lambda x: x[0], micro)
        out_shape = jax.eval_shape(
            grads_of, state.params, first, state.algo_state, state.step, rngs[0], frozen
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), out_shape)

        scalars = lambda aux: {k: v for k, v in aux.items() if not is_per_pair(k)}
        init = (zeros[0], scalars(zeros[1]), state.algo_state, zeros[3])

        def body(carry, xs):
            loss_acc, aux_acc, algo_state, grad_acc = carry
            mb, share, key = xs
            loss, aux, algo_state, grads = grads_of(
                state.params, mb, algo_state, state.step, key, frozen
            )
            add = lambda acc, x: acc + share * x.astype(jnp.float32)
            per_pair = {k: v for k, v in aux.items() if is_per_pair(k)}
            return (
                add(loss_acc, loss),
                jax.tree.map(add, aux_acc, scalars(aux)),
                algo_state,
                jax.tree.map(add, grad_acc, grads),
            ), per_pair

        (loss, aux, algo_state, grads), per_pair = jax.lax.scan(body, init, (micro, shares, rngs))
        # [n, B/n] back to the batch's rows: micro-batch i held rows i, i + n, ...
        aux.update({k: jnp.swapaxes(v, 0, 1).reshape(-1) for k, v in per_pair.items()})
        return loss, aux, algo_state, grads

    def step(state: TrainState, batch: dict, frozen=None):
        rng, step_rng = jax.random.split(state.rng)
        if n_micro == 1:
            loss, aux, algo_state, grads = grads_of(
                state.params, batch, state.algo_state, state.step, step_rng, frozen
            )
        else:
            loss, aux, algo_state, grads = accumulate(state, batch, step_rng, frozen)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        skipped = (~finite).astype(jnp.int32)
        applied = state.step - state.skipped_steps
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=rng,
            algo_state=keep(algo_state, state.algo_state),
            skipped_steps=state.skipped_steps + skipped,
        )
        metrics = {
            **aux,
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/learning_rate": schedule(applied),
            "train/skipped": skipped,
            "train/skipped_total": new_state.skipped_steps,
        }
        return new_state, metrics

    rep = replicated(mesh)
    data = batch_sharding(mesh)
    if frozen_shardings is None:
        return jax.jit(
            lambda state, batch: step(state, batch),
            in_shardings=(state_shardings, data),
            out_shardings=(state_shardings, rep),
            donate_argnums=0,
        )
    return jax.jit(
        step,
        in_shardings=(state_shardings, data, frozen_shardings),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )
