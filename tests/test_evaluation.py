"""Win-rate arithmetic on fixed verdicts."""

import math

import numpy as np
import pytest

from jaxalign.evaluation import win_rate


def test_win_rate_counts_ties_as_half_and_interval_by_hand():
    a = [2, 1, 1, 0, 2]
    b = [1, 1, 2, 0, 0]
    wr = win_rate(a, b)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 2, 1, 5)
    outcomes = np.array([1, 0.5, 0, 0.5, 1])
    assert math.isclose(wr.rate, 0.6)
    half = 1.96 * outcomes.std(ddof=1) / math.sqrt(5)
    assert math.isclose(wr.ci_low, 0.6 - half) and math.isclose(wr.ci_high, min(1.0, 0.6 + half))


def test_win_rate_clips_interval_and_handles_empty():
    wr = win_rate([1, 1, 1], [0, 0, 0])
    assert wr.rate == 1.0 and wr.ci_low == 1.0 and wr.ci_high == 1.0
    assert math.isnan(win_rate([], []).rate)
    with pytest.raises(ValueError, match="equal length"):
        win_rate([1, 2], [1])
