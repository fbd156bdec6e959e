"""scripts/mutation.py's sampling arithmetic (the mutation runs themselves are a separate
command, not part of the suite)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "mutation.py"
_spec = importlib.util.spec_from_file_location("mutation_script", _PATH)
mutation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation)


def test_wilson_interval_is_the_score_test_s_acceptance_region():
    # The Wilson bounds are the p0 at which |p̂ − p0| = z·sqrt(p0(1 − p0)/n) (Wilson 1927).
    for hits, n in ((45, 50), (7, 60), (33, 40)):
        low, high = mutation.wilson(hits, n)
        for p0 in (low, high):
            gap = abs(hits / n - p0) - 1.96 * (p0 * (1 - p0) / n) ** 0.5
            assert abs(gap) < 2e-4, (hits, n, p0)
        assert low < hits / n < high
    # closed forms at the edges: 0 of n is [0, z²/(n + z²)], n of n is [n/(n + z²), 1]
    assert mutation.wilson(0, 10) == pytest.approx([0.0, 1.96**2 / (10 + 1.96**2)], abs=1e-4)
    assert mutation.wilson(10, 10) == pytest.approx([10 / (10 + 1.96**2), 1.0], abs=1e-4)
    assert mutation.wilson(0, 0) == [0.0, 1.0]


def test_a_sample_is_a_seeded_draw_without_replacement():
    names = [f"m{k}" for k in range(100)]
    a = mutation.sample_mutants_from(names, 10, 0)
    assert a == mutation.sample_mutants_from(names, 10, 0) and a == sorted(a)
    assert len(set(a)) == 10 and set(a) <= set(names)
    assert a != mutation.sample_mutants_from(names, 10, 1)
    assert mutation.sample_mutants_from(names[:3], 10, 0) == sorted(names[:3])  # all of them
