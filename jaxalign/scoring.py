"""Scoring passes: log-probs of fixed responses under a model, batched and sharded, no gradients.

Every place that needs ``log π(y|x)`` of responses it already has calls this module:

- the **reference** log-probs of a round's pair batches (:func:`with_reference_logps`),
  computed once so that training holds one model (DPO, SPA's seed round);
- the **judge**'s passes (:func:`response_logps`): SPA's implicit reward
  ``r = β·(log π − log π_init)`` needs each candidate's summed log-prob under both models;
- **evaluation**'s log-probs of exact sampled token ids (:func:`response_logprobs`), for
  the Monte-Carlo KL of :mod:`jaxalign.evaluation`;
- a **reward model**'s scalar scores of token rows (:func:`reward_scores`), for the
  reward-model judges of :mod:`jaxalign.reward_judge`.

Log-probs are summed over response tokens, computed chunk by chunk
(:func:`jaxalign.training.chunked_token_logps`), so no ``[B,T,V]`` logits are held.
On one device (no mesh, or a mesh of one) with ``train.pack_sequences``, the pair passes
pack every sequence of the pass at once (:func:`packed_logps`) into rows of its longest
bucket, or of two or four times that in half or a quarter of the rows, whichever costs
fewest FLOPs (:func:`batch_pair_logps`), so they compute little padding: a pass over short
responses in long buckets costs about what its tokens cost. Otherwise they run batch by
batch on every device of the mesh: the parameters are placed as training places them and
each batch's rows are split over the data axes (every process holds the batch whole and
feeds its own rows), across hosts too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import throughput, training
from jaxalign.data import packing
from jaxalign.data.buckets import bucket_length
from jaxalign.data.pairs import pair_batches
from jaxalign.parallel import place_params, shard_host_batch, to_host

# ----------------------------------------------------------------------------- pair batches


def _model_size(graphdef: nnx.GraphDef, params: nnx.State):
    """``(model, (N, W))``: the model a pass runs and its sizes for its model FLOPs
    (:mod:`jaxalign.throughput`)."""
    model = nnx.merge(graphdef, params)
    return model, (throughput.parameter_count(params), throughput.attention_width(model))


def _counted(run: Callable[[], Any], size: tuple[int, int], lengths, positions: int):
    """``run()`` (a pass's call, returning host arrays), counted in
    :func:`jaxalign.throughput.record_scoring`: sequences of ``lengths`` tokens, ``positions``
    computed, by a model of ``size`` (:func:`_model_size`)."""
    lengths = np.asarray(lengths, np.int64)
    compiles = throughput.compile_stats()["compiles"]
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    tokens = int(lengths.sum())
    throughput.record_scoring(
        int(np.count_nonzero(lengths)),
        tokens,
        positions,
        throughput.model_flops(tokens, int((lengths**2).sum()), *size, passes=1),
        seconds,
        compiled=throughput.compile_stats()["compiles"] > compiles,
    )
    return out


def pair_scorer(
    graphdef: nnx.GraphDef, params: nnx.State, chunk_size: int, mesh=None
) -> Callable[[dict], dict[str, np.ndarray]]:
    """``batch -> {ref_chosen_logps, ref_rejected_logps}``, numpy ``[B]`` each, under ``params``.

    With a ``mesh``, the parameters are placed once as training places them and each
    batch's rows are split over the data axes, so the pass runs on every device of the
    mesh, across hosts too (every process must hold the same batch). Without one, it
    runs on this process's default device.
    """
    placed = place_params(params, mesh)  # once for all batches
    _, size = _model_size(graphdef, params)
    fields = [k for k in training.PAIR_FIELDS if k.endswith(("ids", "mask"))]

    def run(batch):
        if mesh is None:
            ref = training.compute_reference_logps(graphdef, placed, batch, chunk_size)
            return {k: np.asarray(v) for k, v in ref.items()}
        rows = shard_host_batch({k: np.asarray(batch[k]) for k in fields}, mesh)
        ref = training.compute_reference_logps(graphdef, placed, rows, chunk_size)
        return {k: to_host(v) for k, v in ref.items()}

    def score(batch):
        masks = [np.asarray(batch[f"{side}_attention_mask"]) for side in ("chosen", "rejected")]
        lengths = np.concatenate([m.sum(axis=1) for m in masks])
        return _counted(lambda: run(batch), size, lengths, sum(m.size for m in masks))

    return score


def with_reference_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batches: Sequence[dict],
    config: training.TrainConfig,
    progress: bool = False,
    mesh=None,
) -> list[dict]:
    """Each batch with ``ref_chosen_logps``/``ref_rejected_logps`` under ``params`` added,
    computed in ``config.compute_dtype`` as the policy is, so at the first step the policy's
    margins against its reference are zero.

    ``mesh``: run the pass sharded over it (see :func:`pair_scorer`); every process
    must then hold the same ``batches``.
    """
    if config.compute_dtype is not None:  # the dtype the policy computes in
        graphdef = training.compute_graphdef(graphdef, params, config)
    desc = "reference log-probs"
    if packs(config, mesh):
        logps = batch_pair_logps(graphdef, params, batches, config, progress, desc, mesh)
        return [
            {**batch, "ref_chosen_logps": both[:, 0], "ref_rejected_logps": both[:, 1]}
            for batch, both in zip(batches, logps, strict=True)
        ]
    score = pair_scorer(graphdef, params, config.logp_chunk_size, mesh)
    return [{**batch, **score(batch)} for batch in tqdm(batches, desc=desc, disable=not progress)]


def response_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    records: Sequence[dict],
    tokenizer,
    config,
    mesh=None,
    *,
    progress: bool = False,
    desc: str = "judge log-probs",
) -> np.ndarray:
    """``[N, 2]`` summed log-probs of each record's (``chosen``, ``rejected``) response.

    Used by judges: the two slots are just "first" and "second" candidate here. Records
    are tokenised and batched as training batches are (:func:`jaxalign.data.pairs.pair_batches`,
    ``config`` a :class:`jaxalign.config.Config`). ``mesh``: as for :func:`with_reference_logps`.
    """
    batches, report = pair_batches(records, tokenizer, config)
    if report.kept != len(records):
        raise ValueError(
            f"{len(records) - report.kept} of {len(records)} candidate pairs could not be "
            "tokenised for judging; see the pair report"
        )
    out = np.zeros((len(records), 2), np.float64)
    if packs(config.train, mesh):
        logps = batch_pair_logps(graphdef, params, batches, config.train, progress, desc, mesh)
        for batch, both in zip(batches, logps, strict=True):
            rows = np.asarray(batch["index"])
            out[rows[rows >= 0]] = both[rows >= 0]
        return out
    score = pair_scorer(graphdef, params, config.train.logp_chunk_size, mesh)
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        ref = score(batch)
        rows = np.asarray(batch["index"])
        valid = rows >= 0
        out[rows[valid], 0] = ref["ref_chosen_logps"][valid]
        out[rows[valid], 1] = ref["ref_rejected_logps"][valid]
    return out


def packs(config: training.TrainConfig, mesh) -> bool:
    """Whether a pair pass packs its sequences (:func:`packed_logps`): with
    ``config.pack_sequences``, on no mesh or a mesh of one device."""
    return config.pack_sequences and (mesh is None or mesh.size == 1)


def batch_pair_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batches: Sequence[dict],
    config: training.TrainConfig,
    progress: bool = False,
    desc: str = "log-probs",
    mesh=None,
) -> list[np.ndarray]:
    """``[B, 2]`` float32 (chosen, rejected) summed log-probs of each pair batch's rows, all
    batches' sequences packed together (:func:`packed_logps`); padding pairs get 0.

    The calls hold as many positions as ``2 × config.batch_size`` rows of the longest
    batch's length ``T``, so none needs more memory than a training step's forward pass
    over that batch: ``2B`` rows of ``T``, or ``B`` rows of ``2T`` or ``B/2`` of ``4T``,
    whichever computes the pass in the fewest FLOPs
    (:func:`jaxalign.data.packing.cheapest_layout`; longer rows hold sequences of more than
    half of ``T`` two or more to a row, at more attention per position)."""
    found = []  # (batch, pair slot, side) of each sequence
    sequences = []
    for k, batch in enumerate(batches):
        b = training.pair_count(batch)
        for index, ids, loss_mask in packing.pair_sequences(batch):
            found.append((k, index % b, index // b))
            sequences.append((ids, loss_mask))
    longest = max((np.shape(batch["chosen_ids"])[1] for batch in batches), default=1)
    sums = packed_logps(
        graphdef,
        params,
        sequences,
        longest,
        2 * config.batch_size,
        config.logp_chunk_size,
        progress=progress,
        desc=desc,
        mesh=mesh,
    )
    out = [np.zeros((training.pair_count(batch), 2), np.float32) for batch in batches]
    for (k, slot, side), value in zip(found, sums, strict=True):
        out[k][slot, side] = value
    return out


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size",))
def _packed_sums(graphdef, params, *, ids, positions, segments, loss_mask, chunk_size):
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden_states(ids, positions, segments >= 0, segment_ids=segments)
    sums, _ = training.chunked_token_logps(
        model, hidden, ids, loss_mask, chunk_size, segments, num_sequences=ids.size
    )
    return sums


def packed_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    sequences: Sequence[tuple[np.ndarray, np.ndarray]],
    length: int,
    rows: int,
    chunk_size: int = 256,
    *,
    progress: bool = False,
    desc: str = "log-probs",
    mesh=None,
) -> np.ndarray:
    """``[N]`` summed log-probs of ``sequences`` (``(ids, loss_mask)`` each, unpadded; token
    ``t`` is scored, from the logits at ``t-1``, where ``loss_mask[t]`` is 1), on the device of
    ``mesh`` (one device), or this process's default device without one.

    A call holds ``rows`` rows of ``length`` tokens (each sequence at most ``length``), or
    half as many twice as long, or a quarter four times as long, whichever computes the pass
    in the fewest FLOPs (:func:`jaxalign.data.packing.cheapest_layout`, priced by
    :func:`jaxalign.throughput.position_cost`). Every sequence is placed at once in rows of
    that length, longest first into the fullest row that holds it
    (:func:`jaxalign.data.packing.best_fit`), and the rows go through the model that many
    at a time, attention masked to each sequence: one program for the whole pass, and a
    second for the last call, whose row count is rounded up to
    :func:`jaxalign.data.packing.row_multiple` only.
    """
    model, size = _model_size(graphdef, params)
    lengths = [len(ids) for ids, _ in sequences]
    cost = throughput.position_cost(model, size[0])
    length, rows = packing.cheapest_layout([lengths], length, rows, cost)
    placed, used = packing.best_fit(lengths, length)
    calls: list[list[int]] = [[] for _ in range(-(-used // rows))]
    step = packing.row_multiple(rows)
    for k, (row, _) in enumerate(placed):
        calls[row // rows].append(k)
    on_device = place_params(params, mesh)
    out = np.zeros(len(sequences), np.float64)
    for call, members in enumerate(tqdm(calls, desc=desc, disable=not progress, unit="batch")):
        held = min(rows, -(-(used - call * rows) // step) * step)
        arrays = packing.fill_rows(
            [(j, *sequences[k]) for j, k in enumerate(members)],
            [(placed[k][0] - call * rows, placed[k][1]) for k in members],
            held,
            length,
        )
        sums = _counted(
            lambda arrays=arrays: np.asarray(
                _packed_sums(graphdef, on_device, **arrays, chunk_size=chunk_size)
            ),
            size,
            [lengths[k] for k in members],
            held * length,
        )
        out[members] = sums[: len(members)]
    return out


def response_token_counts(records: Sequence[dict], tokenizer, config) -> np.ndarray:
    """``[N, 2]`` tokens scored per (``chosen``, ``rejected``) response, as :func:`response_logps`
    scores them (after truncation, EOS included when the response had one)."""
    batches, _ = pair_batches(records, tokenizer, config)
    out = np.zeros((len(records), 2), np.int64)
    for batch in batches:
        rows = np.asarray(batch["index"])
        valid = rows >= 0
        out[rows[valid], 0] = np.asarray(batch["chosen_loss_mask"]).sum(1)[valid]
        out[rows[valid], 1] = np.asarray(batch["rejected_loss_mask"]).sum(1)[valid]
    return out


# ----------------------------------------------------------------------------- token rows


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size",))
def _sequence_logps(graphdef, params, ids, attention_mask, loss_mask, chunk_size):
    model = nnx.merge(graphdef, params)
    logps, _ = training.sequence_logps(model, ids, attention_mask, loss_mask, chunk_size)
    return logps


def pack_responses(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    width: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """``ids, attention_mask, loss_mask [B, width]``, prompt + response right-padded;
    ``loss_mask`` is 1 on response tokens (the pair-batch row layout)."""
    b = len(prompt_ids)
    ids = np.full((b, width), pad_id, np.int32)
    attention = np.zeros((b, width), np.int32)
    loss = np.zeros((b, width), np.int32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        n, m = len(p), len(r)
        ids[i, : n + m] = [*p, *r]
        attention[i, : n + m] = 1
        loss[i, n : n + m] = 1
    return {"ids": ids, "attention_mask": attention, "loss_mask": loss}


def response_logprobs(
    model,
    tokenizer,
    prompts: Sequence,
    response_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    chunk_size: int = 256,
    use_chat_template: bool = True,
) -> np.ndarray:
    """``log π(y_i | x_i)`` ``[N]`` (float64) of the exact response token ids, by a forward pass.

    Prompts are encoded as the sampler encodes them (chat template applied);
    ``response_ids[i]`` are the generated ids, EOS included when one was produced.
    Rows are grouped by length buckets (``jaxalign.data.buckets``) and batches filled with empty
    rows to ``batch_size``, so a run compiles one program per bucket.
    """
    graphdef, params = nnx.split(model)
    context = model.config.max_position_embeddings
    prompt_ids = [tokenizer.encode_prompt(p, use_chat_template=use_chat_template) for p in prompts]
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    for i, length in enumerate(lengths):
        if length > context:
            raise ValueError(
                f"prompt {i}: prompt + response is {length} tokens, more than the model's "
                f"context of {context}"
            )
    by_bucket: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_bucket.setdefault(bucket_length(length, context), []).append(i)
    out = np.zeros(len(prompts), np.float64)
    pad_id = int(tokenizer.pad_token_id)
    for width in sorted(by_bucket):
        members = by_bucket[width]
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            filler = batch_size - len(rows)
            batch = pack_responses(
                [prompt_ids[i] for i in rows] + [[]] * filler,
                [response_ids[i] for i in rows] + [[]] * filler,
                width,
                pad_id,
            )
            logps = _sequence_logps(
                graphdef,
                params,
                batch["ids"],
                batch["attention_mask"],
                batch["loss_mask"],
                chunk_size=min(chunk_size, width),
            )
            out[rows] = np.asarray(logps)[: len(rows)]
    return out


# ----------------------------------------------------------------------------- rewards


@nnx.jit
def _reward_batch(model, tokens, attention_mask):
    return model(tokens, attention_mask)


def reward_scores(
    model, rows: Sequence[Sequence[int]], *, pad_id: int, batch_size: int, max_length: int
) -> np.ndarray:
    """``[N]`` float32 scores of token rows (prompt + response ids) by a scalar reward model
    (``model(tokens, attention_mask) -> [B]``, e.g. :class:`jaxalign.models.reward.RewardModel`).

    Rows are scored shortest first, ``batch_size`` at a time, each batch right-padded to
    its power-of-two length bucket (at most ``max_length``); padding rows see one token,
    so nothing divides by zero.
    """
    out = np.zeros(len(rows), np.float32)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        length = bucket_length(max(len(rows[i]) for i in members), max_length)
        ids = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        mask[:, 0] = 1
        for j, i in enumerate(members):
            ids[j, : len(rows[i])] = rows[i]
            mask[j, : len(rows[i])] = 1
        scores = np.asarray(_reward_batch(model, jnp.asarray(ids), jnp.asarray(mask)))
        out[members] = scores[: len(members)]
    return out
