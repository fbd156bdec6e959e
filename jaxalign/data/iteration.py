"""Deterministic, resumable epoch iteration over record indices, sharded per host.

Epoch ``e`` visits the permutation ``epoch_order(n, seed, e)`` of ``range(n)`` (a
``numpy`` PCG64 stream seeded with ``(seed, e)``, so any epoch is recomputed without
replaying earlier ones). Host ``p`` of ``P`` reads ``order[p::P]``: the shares are
disjoint and together cover the epoch. With ``drop_remainder`` every host gets the same
``n // P`` indices, so hosts stay in step (the last ``n % P`` of each order are left out
of that epoch only; the next epoch's order differs).

The position is ``(epoch, offset)``: ``offset`` counts indices this host has already
yielded in ``epoch``. Saving ``state()`` and building a new iterator with
``EpochIterator.from_state(state)`` continues with exactly the indices the old one would
have yielded next.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def epoch_order(num_records: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a seeded permutation of ``range(num_records)``."""
    if not shuffle:
        return np.arange(num_records, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def shard_indices(
    order: np.ndarray, process_index: int, process_count: int, drop_remainder: bool = False
) -> np.ndarray:
    """Host ``process_index``'s share ``order[process_index::process_count]``.

    ``drop_remainder`` first cuts ``order`` to a multiple of ``process_count``.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if drop_remainder:
        order = order[: len(order) - len(order) % process_count]
    return order[process_index::process_count]


@dataclasses.dataclass
class EpochIterator:
    """Endless iterator of record indices (``int``) for this host; ``state()`` saves its place.

    ``num_records``: size of the split; ``seed``: shuffle seed; ``epoch``/``offset``: the
    position to start from; ``process_index``/``process_count``: this host and the number
    of hosts (``jax.process_index()``, ``jax.process_count()``).
    """

    num_records: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1
    drop_remainder: bool = False
    epoch: int = 0
    offset: int = 0

    def __post_init__(self):
        if self.num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {self.num_records}")
        if self.offset < 0 or self.epoch < 0:
            raise ValueError(f"epoch and offset must be >= 0, got {self.epoch}, {self.offset}")
        self._share = None
        self._share_epoch = None
        if len(self._epoch_share()) == 0:
            raise ValueError(
                f"{self.num_records} records leave host {self.process_index} of "
                f"{self.process_count} nothing to read"
            )

    def _epoch_share(self) -> np.ndarray:
        if self._share_epoch != self.epoch:
            order = epoch_order(self.num_records, self.seed, self.epoch, self.shuffle)
            self._share = shard_indices(
                order, self.process_index, self.process_count, self.drop_remainder
            )
            self._share_epoch = self.epoch
        return self._share

    def __iter__(self):
        return self

    def __next__(self) -> int:
        share = self._epoch_share()
        while self.offset >= len(share):
            self.epoch, self.offset = self.epoch + 1, self.offset - len(share)
            share = self._epoch_share()
        index = int(share[self.offset])
        self.offset += 1
        return index

    def take(self, count: int) -> list[int]:
        """The next ``count`` indices (e.g. one batch)."""
        return [next(self) for _ in range(count)]

    def state(self) -> dict:
        """A JSON-able snapshot of the position and everything that defines the order."""
        return {
            "num_records": self.num_records,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "drop_remainder": self.drop_remainder,
            "epoch": self.epoch,
            "offset": self.offset,
        }

    @classmethod
    def from_state(cls, state: dict, **expected) -> EpochIterator:
        """Rebuilds an iterator from ``state()``; ``expected`` fields must match the saved ones.

        E.g. ``from_state(s, num_records=len(split))`` fails loudly if the data changed.
        """
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"saved iterator state has {key}={state.get(key)!r} but {value!r} was "
                    "expected; the data or host layout changed since it was saved"
                )
        return cls(**state)
