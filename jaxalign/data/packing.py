"""Several sequences of a pair batch in one row: less padding for the same step.

A pair batch (``jaxalign.training``) holds ``2B`` right-padded rows of its bucket's
length ``T``: the chosen and the rejected sequence of every pair. When the sequences are
much shorter than ``T``, or a batch carries weight-0 padding pairs, most of those
positions are padding that every layer computes. :func:`pack_pair_rows` places the
sequences one after another in fewer rows (first fit, longest first)
and records for every position the sequence it belongs to; the forward pass then masks
attention to each sequence (``Transformer.hidden_states(segment_ids=...)``), restarts the
positions at each sequence's start, and sums log-probs per sequence
(:func:`jaxalign.training.token_rows`). The loss sees the same ``[B]`` log-probs as
from the unpacked batch, so a packed step is the same step, computed on fewer rows.

The train loop packs every batch of a run into rows of the run's longest bucket and
rounds the row count up to a quarter of ``2B`` (:func:`packed_row_multiple`), so a run
compiles at most four step shapes; the row count never exceeds ``2B``, so a packed step
never needs more memory than the run's longest unpacked one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SIDES = ("chosen", "rejected")
_UNPACKED = tuple(
    f"{side}_{name}" for side in SIDES for name in ("ids", "attention_mask", "loss_mask")
)


def packed_row_multiple(batch_size: int, shards: int = 1) -> int:
    """The step between packed row counts: the smallest divisor of a batch's ``2B`` rows
    that is at least a quarter of them (so a run compiles at most four row counts per
    length) and a whole number of ``shards`` (the batch's data-parallel split)."""
    rows = 2 * batch_size
    fits = (d for d in range(shards, rows + 1, shards) if rows % d == 0 and 4 * d >= rows)
    return min(fits, default=rows)


def pack_pair_rows(
    batch: Mapping[str, np.ndarray], row_multiple: int = 1, length: int | None = None
) -> dict[str, np.ndarray]:
    """``batch`` with its chosen and rejected rows packed (:data:`jaxalign.training.PACKED_FIELDS`).

    ``batch``: a pair batch as :mod:`jaxalign.data.pairs` builds it (right-padded rows).
    Sequence ``i`` is pair ``i``'s chosen response with its prompt, sequence ``B + i`` its
    rejected one; a pair with no tokens (a padding pair) takes no room. Returns the other
    fields unchanged plus ``packed_ids``, ``packed_positions`` (0, 1, ... within each
    sequence), ``packed_segments`` (the sequence of each position, -1 on padding) and
    ``packed_loss_mask``, each ``[R, L]``. ``L`` is ``length`` (default: the batch's own
    ``T``). ``R`` is the rows the sequences need, longest first into the first row with
    room, rounded up to a multiple of ``row_multiple`` (which must divide ``2B``, see
    :func:`packed_row_multiple`) and at most ``2B``.
    """
    missing = [name for name in _UNPACKED if name not in batch]
    if missing:
        raise ValueError(f"a pair batch to pack needs {', '.join(missing)}")
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be positive, got {row_multiple}")
    b, t = np.shape(batch["chosen_ids"])
    if length is not None and length < t:
        raise ValueError(f"packed rows of {length} tokens cannot hold the batch's rows of {t}")
    t = t if length is None else length
    sequences = []  # (length, sequence index, ids, loss mask)
    for k, side in enumerate(SIDES):
        ids = np.asarray(batch[f"{side}_ids"])
        attention = np.asarray(batch[f"{side}_attention_mask"]).astype(bool)
        loss_mask = np.asarray(batch[f"{side}_loss_mask"])
        for i in range(b):
            n = int(attention[i].sum())
            if n and not attention[i, :n].all():
                raise ValueError(
                    f"{side} row {i} is not right-padded (its attention mask has a gap); "
                    "packing needs the pair-batch layout of jaxalign.data.pairs"
                )
            if n:
                sequences.append((n, k * b + i, ids[i, :n], loss_mask[i, :n]))
    sequences.sort(key=lambda s: (-s[0], s[1]))
    fill: list[int] = []  # tokens placed in each row
    placed = []  # (row, start, sequence)
    for seq in sequences:
        row = next((r for r, used in enumerate(fill) if used + seq[0] <= t), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        placed.append((row, fill[row], seq))
        fill[row] += seq[0]
    rows = min(max(1, -(-len(fill) // row_multiple)) * row_multiple, 2 * b)
    if rows % row_multiple:  # rounding up went past 2B
        raise ValueError(
            f"row_multiple {row_multiple} does not divide the batch's {2 * b} rows; "
            "see packed_row_multiple"
        )
    out = {k: v for k, v in batch.items() if k not in _UNPACKED}
    out["packed_ids"] = np.zeros((rows, t), np.int32)  # padding ids are never attended
    out["packed_positions"] = np.zeros((rows, t), np.int32)
    out["packed_segments"] = np.full((rows, t), -1, np.int32)
    out["packed_loss_mask"] = np.zeros((rows, t), np.int32)
    for row, start, (n, index, ids, loss_mask) in placed:
        span = slice(start, start + n)
        out["packed_ids"][row, span] = ids
        out["packed_positions"][row, span] = np.arange(n)
        out["packed_segments"][row, span] = index
        out["packed_loss_mask"][row, span] = loss_mask
    return out
