"""Several sequences of a pair batch in one row: less padding for the same step.

A pair batch (``jaxalign.training``) holds ``2B`` right-padded rows of its bucket's
length ``T``: the chosen and the rejected sequence of every pair. When the sequences are
much shorter than ``T``, or a batch carries weight-0 padding pairs, most of those
positions are padding that every layer computes. :func:`pack_pair_rows` places the
sequences one after another in fewer rows (longest first, each into the fullest row that
holds it: :func:`best_fit`) and records for every position the sequence it belongs to;
the forward pass then masks
attention to each sequence (``Transformer.hidden_states(segment_ids=...)``), restarts the
positions at each sequence's start, and sums log-probs per sequence
(:func:`jaxalign.training.token_rows`). The loss sees the same ``[B]`` log-probs as
from the unpacked batch, so a packed step is the same step, computed on fewer rows.

The train loop packs every batch of a run in one row layout (:func:`cheapest_layout`):
``2B`` rows of the run's longest bucket ``T``, ``B`` rows of ``2T`` or ``B/2`` of ``4T``,
whichever computes the run in the fewest FLOPs (longer rows hold two or more sequences of
more than ``T/2``, at more attention per position), the row count rounded up to a quarter
of the most (:func:`row_multiple`), so a run compiles at most four step shapes, none with
more positions than the longest unpacked batch. The scoring passes (:mod:`jaxalign.scoring`)
pack all their sequences at once the same way (:func:`best_fit`, :func:`fill_rows`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence

import numpy as np

SIDES = ("chosen", "rejected")
_UNPACKED = tuple(
    f"{side}_{name}" for side in SIDES for name in ("ids", "attention_mask", "loss_mask")
)


def row_multiple(rows: int, shards: int = 1) -> int:
    """The step between packed row counts of calls of up to ``rows`` rows: the smallest
    divisor of ``rows`` that is at least a quarter of it (so at most four row counts per
    row length compile) and a whole number of ``shards`` (a data-parallel split)."""
    fits = (d for d in range(shards, rows + 1, shards) if rows % d == 0 and 4 * d >= rows)
    return min(fits, default=rows)


def packed_row_multiple(batch_size: int, shards: int = 1) -> int:
    """:func:`row_multiple` of a pair batch's ``2B`` rows."""
    return row_multiple(2 * batch_size, shards)


def row_layouts(length: int, rows: int) -> list[tuple[int, int]]:
    """The packed layouts of ``rows`` rows of ``length`` tokens with no more positions:
    ``(length·f, rows/f)`` for ``f`` = 1, 2, 4 where ``f`` divides ``rows``. Longer rows hold
    sequences of up to ``length`` tokens more tightly (a row of ``length`` holds just one of
    more than half of it) and cost more attention per position."""
    return [(length * f, rows // f) for f in (1, 2, 4) if rows % f == 0]


def cheapest_layout(
    groups: Sequence[Sequence[int]],
    length: int,
    rows: int,
    position_cost: Callable[[int], float],
) -> tuple[int, int]:
    """Of :func:`row_layouts` ``(row length, rows per call)``, the one whose packing costs
    least: each group of sequence lengths (each at most ``length``) packed on its own
    (:func:`best_fit`) into calls of that many rows, the last call's rows rounded up to
    :func:`row_multiple`, each computed position costing ``position_cost(row length)``
    (e.g. :func:`jaxalign.throughput.position_cost`). Ties go to the shorter rows."""
    best = None
    for row_length, per_call in row_layouts(length, rows):
        step = row_multiple(per_call)
        positions = 0
        for lengths in groups:
            _, used = best_fit(lengths, row_length)
            full, rest = divmod(used, per_call)
            positions += (full * per_call + -(-rest // step) * step) * row_length
        cost = positions * position_cost(row_length)
        if best is None or cost < best[0]:
            best = (cost, row_length, per_call)
    return best[1], best[2]


def pack_pair_rows(
    batch: Mapping[str, np.ndarray],
    row_multiple: int = 1,
    length: int | None = None,
    max_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """``batch`` with its chosen and rejected rows packed (:data:`jaxalign.training.PACKED_FIELDS`).

    ``batch``: a pair batch as :mod:`jaxalign.data.pairs` builds it (right-padded rows).
    Sequence ``i`` is pair ``i``'s chosen response with its prompt, sequence ``B + i`` its
    rejected one; a pair with no tokens (a padding pair) takes no room. Returns the other
    fields unchanged plus ``packed_ids``, ``packed_positions`` (0, 1, ... within each
    sequence), ``packed_segments`` (the sequence of each position, -1 on padding) and
    ``packed_loss_mask``, each ``[R, L]``. ``L`` is ``length`` (default: the batch's own
    ``T``). ``R`` is the rows the sequences need (:func:`best_fit`), rounded up to a
    multiple of ``row_multiple`` (which must divide ``max_rows``, see :func:`row_multiple`)
    and at most ``max_rows`` (default ``2B``; rows of ``f·T`` tokens never need more than
    ``2B/f``: :func:`row_layouts`).
    """
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be positive, got {row_multiple}")
    sequences = pair_sequences(batch)
    b, t = np.shape(batch["chosen_ids"])
    if length is not None and length < t:
        raise ValueError(f"packed rows of {length} tokens cannot hold the batch's rows of {t}")
    t = t if length is None else length
    placed, used_rows = best_fit([len(ids) for _, ids, _ in sequences], t)
    cap = 2 * b if max_rows is None else max_rows
    if used_rows > cap:
        raise ValueError(f"the batch's sequences need {used_rows} rows of {t}, more than {cap}")
    rows = min(max(1, -(-used_rows // row_multiple)) * row_multiple, cap)
    if rows % row_multiple:  # rounding up went past the cap
        raise ValueError(
            f"row_multiple {row_multiple} does not divide the batch's {cap} rows; see row_multiple"
        )
    out = {k: v for k, v in batch.items() if k not in _UNPACKED}
    rows_out = fill_rows(sequences, placed, rows, t)
    out.update({f"packed_{k}": v for k, v in rows_out.items()})
    return out


def pair_sequences(batch: Mapping[str, np.ndarray]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The sequences of a pair batch's rows, ``(index, ids, loss_mask)`` each without its
    padding: pair ``i``'s chosen one has index ``i``, its rejected one ``B + i``; rows with
    no tokens (padding pairs) are left out. Errors name a missing field or a row whose
    attention mask has a gap (not the right-padded layout of :mod:`jaxalign.data.pairs`)."""
    missing = [name for name in _UNPACKED if name not in batch]
    if missing:
        raise ValueError(f"a pair batch to pack needs {', '.join(missing)}")
    b = np.shape(batch["chosen_ids"])[0]
    sequences = []
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
                sequences.append((k * b + i, ids[i, :n], loss_mask[i, :n]))
    return sequences


def best_fit(lengths: Sequence[int], length: int) -> tuple[list[tuple[int, int]], int]:
    """Where each sequence of ``lengths`` goes in rows of ``length`` tokens: longest first
    (ties in the given order), each into the row with the least room that still holds it,
    else a new row (best fit decreasing; ``O(n log n)``, so a whole dataset packs at once).
    Returns ``(row, start)`` per sequence, in the given order, and the rows used."""
    too_long = [n for n in lengths if n > length]
    if too_long:
        raise ValueError(f"a sequence of {max(too_long)} tokens does not fit rows of {length}")
    rooms: list[tuple[int, int]] = []  # (room left, row) of rows not yet full, ascending
    placed = [(0, 0)] * len(lengths)
    rows = 0
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[k]
        j = bisect.bisect_left(rooms, (n, -1))
        if j == len(rooms):
            room, row = length, rows
            rows += 1
        else:
            room, row = rooms.pop(j)
        placed[k] = (row, length - room)
        if room > n:
            bisect.insort(rooms, (room - n, row))
    return placed, rows


def fill_rows(
    sequences: Sequence[tuple[int, np.ndarray, np.ndarray]],
    placed: Sequence[tuple[int, int]],
    rows: int,
    length: int,
) -> dict[str, np.ndarray]:
    """``ids, positions, segments, loss_mask`` ``[rows, length]`` int32 holding each
    ``(segment, ids, loss_mask)`` of ``sequences`` at its ``(row, start)`` of ``placed``
    (:func:`best_fit`); positions restart at 0 in each sequence, segments are -1 (and
    ids, loss mask 0) wherever no sequence is."""
    out = {
        "ids": np.zeros((rows, length), np.int32),  # padding ids are never attended
        "positions": np.zeros((rows, length), np.int32),
        "segments": np.full((rows, length), -1, np.int32),
        "loss_mask": np.zeros((rows, length), np.int32),
    }
    for (segment, ids, loss_mask), (row, start) in zip(sequences, placed, strict=True):
        span = slice(start, start + len(ids))
        out["ids"][row, span] = ids
        out["positions"][row, span] = np.arange(len(ids))
        out["segments"][row, span] = segment
        out["loss_mask"][row, span] = loss_mask
    return out
