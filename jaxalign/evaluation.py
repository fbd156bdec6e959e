"""Evaluation: pairwise win rates under a gold judge, with ties and a 95% interval.

A comparison gives each prompt one outcome for model A against model B: a win
(1), a tie (½) or a loss (0), decided by the gold judge's scores of the two
responses. The win rate is the mean outcome; its 95% interval is the normal
approximation ``mean ± 1.96·s/√n`` (s the sample standard deviation of the
outcomes), clipped to [0, 1] — the form AlpacaEval reports for its win rates.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int
    rate: float  # (wins + ties/2) / n
    ci_low: float
    ci_high: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"n": self.n}


def win_rate(scores_a, scores_b, z: float = 1.96) -> WinRate:
    """Win rate of A over B from per-prompt gold scores ``[N]`` (higher is better)."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two score vectors of equal length, got {a.shape} and {b.shape}")
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    n = outcome.size
    if n == 0:
        return WinRate(0, 0, 0, float("nan"), float("nan"), float("nan"))
    rate = float(outcome.mean())
    sd = float(outcome.std(ddof=1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return WinRate(
        wins=int((a > b).sum()),
        ties=int((a == b).sum()),
        losses=int((a < b).sum()),
        rate=rate,
        ci_low=max(0.0, rate - half),
        ci_high=min(1.0, rate + half),
    )
