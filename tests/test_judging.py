"""Judging and pair making against hand computations."""

import math

import numpy as np
import pytest

from jaxalign import judging
from jaxalign.judging import Candidate


def test_implicit_reward_and_probability_by_hand():
    # β = 0.1; log π = [-10, -12], log π_init = [-11, -11]
    r = judging.implicit_reward(np.array([-10.0, -12.0]), np.array([-11.0, -11.0]), 0.1)
    np.testing.assert_allclose(r, [0.1, -0.1])
    p = judging.preference_probability(r[0], r[1])
    assert math.isclose(float(p), 1 / (1 + math.exp(-0.2)), rel_tol=1e-12)
    # stable at extreme margins
    assert float(judging.preference_probability(800.0, 0.0)) == 1.0
    assert float(judging.preference_probability(-800.0, 0.0)) == 0.0


def test_label_is_invariant_to_candidate_order():
    a, b = Candidate("short answer"), Candidate("a much longer answer")
    p1 = judging.label_pair("x", "q", a, b, 0.3, -0.2)
    p2 = judging.label_pair("x", "q", b, a, -0.2, 0.3)
    assert p1 == p2
    assert p1.chosen == "short answer" and p1.rejected == "a much longer answer"
    assert math.isclose(p1.margin, 0.5)
    assert math.isclose(p1.p, 1 / (1 + math.exp(-0.5)))


def test_make_pairs_counts_every_candidate_pair():
    ids = ["a", "b", "c", "d", "e"]
    prompts = ["q"] * 5
    cands = [
        [Candidate("x"), Candidate("y")],
        [Candidate("same"), Candidate(" same ")],
        [Candidate(""), Candidate("y")],
        [Candidate("x", finished=False), Candidate("y")],
        [Candidate("x"), Candidate("z")],
    ]
    rewards = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5]]
    pairs, counts = judging.make_pairs(ids, prompts, cands, rewards)
    assert [p.id for p in pairs] == ["a", "d"]
    assert (pairs[1].chosen, pairs[1].chosen_eos, pairs[1].rejected_eos) == ("y", True, False)
    assert (counts.identical, counts.empty, counts.tied, counts.truncated) == (1, 1, 1, 0)
    assert counts.considered == counts.kept + counts.skipped == 5
    pairs, counts = judging.make_pairs(ids, prompts, cands, rewards, skip_truncated=True)
    assert [p.id for p in pairs] == ["a"] and counts.truncated == 1


def test_answer_checker_scores():
    check = judging.AnswerChecker(max_words=8)
    rec = {"id": "1", "answer": ["Paris"]}
    s = check(
        ["q"] * 4,
        [
            "The capital of France is Paris.",
            "It is Lyon.",
            "Paris is the capital, and it is also a very large and famous city.",
            "Parisian food is great.",
        ],
        [rec] * 4,
    )
    np.testing.assert_array_equal(s, [2.0, 1.0, 1.0, 1.0])
    assert check(["q"], ["Paris."], [rec], finished=[False])[0] == 1.0
    counts = judging.AnswerChecker()(["q"], ["There are seven."], [{"answer": ["7", "seven"]}])
    assert counts[0] == 2.0
    with pytest.raises(ValueError, match="no 'answer'"):
        check(["q"], ["x"], [{"id": "9"}])


def test_gold_agreement():
    agree, n = judging.gold_agreement(np.array([2, 1, 1, 0]), np.array([1, 1, 2, 0]))
    assert n == 2 and agree == 0.5
    agree, n = judging.gold_agreement(np.array([1]), np.array([1]))
    assert n == 0 and math.isnan(agree)


def test_unknown_rule_judge():
    with pytest.raises(ValueError, match="demo-checker"):
        judging.get_rule_judge("gpt-judge")


def test_length_normalised_implicit_reward_by_hand():
    r = judging.implicit_reward(np.array([-10.0, -12.0]), np.array([-14.0, -11.0]), 0.5, [4, 2])
    np.testing.assert_allclose(r, [0.5 * 4 / 4, 0.5 * -1 / 2])
