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
    pairs, counts = judging.make_pairs(ids, prompts, cands, rewards, truncated_policy="skip")
    assert [p.id for p in pairs] == ["a"] and counts.truncated == 1
    pairs, counts = judging.make_pairs(ids, prompts, cands, rewards, truncated_policy="reject")
    assert [p.id for p in pairs] == ["a", "d"] and counts.by_rule == 1  # d: decided by the rule


def _cands(*specs):
    """Candidates from ``"text"`` (finished) or ``"text~"`` (cut at the token limit)."""
    return [Candidate(s.rstrip("~"), finished=not s.endswith("~")) for s in specs]


@pytest.mark.parametrize(
    ("specs", "rewards", "policy", "expected"),
    [
        # best against worst by reward among distinct non-empty responses
        (("a", "b", "c", "d"), (0.1, 0.9, -0.3, 0.2), "keep", (1, 2, None)),
        (("a", "b", " b ", "c"), (0.0, 0.5, 0.9, 0.1), "keep", (1, 0, None)),  # a repeat drops
        (("a", "", "", ""), (0.0, 1.0, 2.0, 3.0), "keep", "empty"),
        (("a", "a", " a"), (0.0, 1.0, 2.0), "keep", "identical"),
        (("a", "b", "c"), (0.5, 0.5, 0.5), "keep", "tied"),
        (("a", "b", "c"), (0.5, 0.7, 0.7), "keep", (1, 0, None)),  # a tie goes to the first
        # a cut response competes (keep), is left out (skip), or always loses (reject)
        (("a~", "b", "c"), (0.9, 0.1, 0.0), "keep", (0, 2, None)),
        (("a~", "b", "c"), (0.9, 0.1, 0.0), "skip", (1, 2, None)),
        (("a~", "b", "c~"), (0.9, 0.1, 0.0), "skip", "truncated"),
        (("a~", "b", "c"), (0.9, 0.1, 0.0), "reject", (1, 0, "finished_over_truncated")),
        (("a~", "b~", "c"), (0.9, 0.1, 0.0), "reject", (2, 1, "finished_over_truncated")),
        (("a~", "b~"), (0.9, 0.1), "reject", "truncated"),
        (("a", "b"), (0.9, 0.1), "reject", (0, 1, None)),
    ],
)
def test_select_pair(specs, rewards, policy, expected):
    assert judging.select_pair(_cands(*specs), rewards, policy) == expected


def test_rule_decided_pairs_are_certain():
    pairs, counts = judging.make_pairs(
        ["q"], ["p"], [_cands("long run-on~", "short")], [[2.0, -1.0]], truncated_policy="reject"
    )
    (pair,) = pairs
    assert (pair.chosen, pair.rejected, pair.rule) == (
        "short",
        "long run-on",
        "finished_over_truncated",
    )
    assert pair.margin == -3.0 and pair.p == 1.0 and counts.by_rule == 1
    with pytest.raises(ValueError, match="truncated_policy must be one of keep, skip, reject"):
        judging.select_pair(_cands("a", "b"), [0.0, 1.0], "drop")


def test_most_confident_keeps_the_largest_margins_in_order():
    pairs, _ = judging.make_pairs(
        list("abcde"),
        ["p"] * 5,
        [_cands("x", "y")] * 4 + [_cands("x~", "y")],
        [[0.3, 0.0], [0.0, 0.1], [0.5, 0.0], [0.0, 0.2], [9.0, 0.0]],
        truncated_policy="reject",
    )
    margins = {p.id: round(p.margin, 6) for p in pairs}
    assert margins == {"a": 0.3, "b": 0.1, "c": 0.5, "d": 0.2, "e": -9.0}
    assert [p.id for p in judging.most_confident(pairs, 0.6)] == ["a", "c", "e"]  # e: by rule
    assert [p.id for p in judging.most_confident(pairs, 1.0)] == list("abcde")
    with pytest.raises(ValueError, match="fraction must be in"):
        judging.most_confident(pairs, 0.0)


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


def test_every_field_of_a_judged_pair():
    """make_pairs' pair, field by field: the prompt, both texts, rewards, margin, p, EOS
    flags, the rule and which candidates were picked."""
    cands = [Candidate("mid"), Candidate("best", finished=False), Candidate("worst")]
    (pair,), counts = judging.make_pairs(["q1"], [{"text": "Q?"}], [cands], [[0.2, 0.9, -0.4]])
    assert pair == judging.JudgedPair(
        id="q1",
        prompt={"text": "Q?"},
        chosen="best",
        rejected="worst",
        reward_chosen=0.9,
        reward_rejected=-0.4,
        margin=pytest.approx(1.3),
        p=pytest.approx(1 / (1 + math.exp(-1.3))),
        chosen_eos=False,
        rejected_eos=True,
        rule=None,
        chosen_index=1,
        rejected_index=2,
    )
    labelled = judging.label_pair("q2", "P", cands[0], cands[2], 0.2, -0.4)
    assert (labelled.id, labelled.prompt, labelled.reward_chosen, labelled.reward_rejected) == (
        "q2",
        "P",
        0.2,
        -0.4,
    )
    assert (labelled.chosen_index, labelled.rejected_index) == (None, None)


def test_rule_decided_pairs_are_all_counted():
    cands = [[Candidate("a"), Candidate("b", finished=False)]] * 3
    pairs, counts = judging.make_pairs(
        ["x", "y", "z"], ["q"] * 3, cands, [[0.0, 1.0]] * 3, truncated_policy="reject"
    )
    assert len(pairs) == 3 and counts.by_rule == 3
    assert all((p.chosen_index, p.rejected_index, p.p) == (0, 1, 1.0) for p in pairs)


def test_bad_inputs_are_clear_errors():
    one = [Candidate("a")]
    with pytest.raises(ValueError, match="prompt a: need 2 candidates to form a pair, got 1"):
        judging.make_pairs(["a"], ["q"], [one], [[0.0]])
    with pytest.raises(ValueError):  # more ids than candidate lists
        judging.make_pairs(["a", "b"], ["q", "q"], [[Candidate("x"), Candidate("y")]], [[0, 1]])
    with pytest.raises(ValueError, match="2 candidates but 3 rewards"):
        judging.select_pair([Candidate("x"), Candidate("y")], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        judging.most_confident([], 1.5)
    with pytest.raises(
        ValueError,
        match="unknown judge 'nope'; registered rule judges: demo-checker, instruction-checker",
    ):
        judging.get_rule_judge("nope")


def test_select_pair_defaults_to_keep_and_breaks_ties_by_position():
    cands = _cands("a", "b~", "c", "d")
    rewards = [0.5, 0.9, 0.5, 0.1]
    assert judging.select_pair(cands, rewards) == judging.select_pair(cands, rewards, "keep")
    assert judging.select_pair(cands, rewards) == (1, 3, None)
    # equal best rewards among finished responses: the earlier one is chosen
    assert judging.select_pair(cands, rewards, "reject") == (0, 1, "finished_over_truncated")
    assert judging.select_pair(_cands("a", "b", "c"), [0.7, 0.7, 0.1]) == (0, 2, None)


def test_one_token_responses_are_divided_by_one():
    r = judging.implicit_reward(
        np.array([-3.0, -5.0, -2.0]), np.array([-4.0, -4.0, -2.0]), 0.5, num_tokens=[1, 2, 0]
    )
    np.testing.assert_allclose(r, [0.5, -0.25, 0.0])


def test_gold_agreement_without_separated_pairs_is_nan_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agreement, n = judging.gold_agreement(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert math.isnan(agreement) and n == 0


def test_answer_checker_edges():
    judge = judging.AnswerChecker(max_words=3)
    records = [{"id": "r", "answer": "Paris"}]
    assert judge.concise("one two three") and not judge.concise("one two three four")
    assert not judge.concise("") and not judge.concise("...")  # no words is not an answer
    assert judge.concise("one") and not judge.concise("one", finished=False)
    scores = judge([""], ["It is in Paris."], records)
    assert scores.dtype == np.float32 and scores.tolist() == [1.0]  # correct, not concise
    assert judge([""], ["Paris"], [{"id": "r", "answer": ["Lyon", "Paris"]}]).tolist() == [2.0]
    with pytest.raises(
        ValueError, match=r"^AnswerChecker needs the prompt records \(with their 'answer' field\)$"
    ):
        judge([""], ["Paris"])
    with pytest.raises(ValueError, match=r"record 0 \(id 'r'\) has no 'answer' field"):
        judge([""], ["Paris"], [{"id": "r"}])
    with pytest.raises(ValueError):  # one record for two responses
        judge(["", ""], ["Paris", "Paris"], records)


def test_length_controlled_rewards_by_hand():
    rewards = [[1.0, 3.0, 2.0], [0.0, -2.0]]
    lengths = [[10, 30, 20], [5, 15]]
    # within-prompt: Σ(r − r̄)(n − n̄) = 20 and −10, Σ(n − n̄)² = 200 and 50 → b = 10 / 250
    adjusted, slope = judging.length_controlled_rewards(rewards, lengths)
    assert math.isclose(slope, 0.04, rel_tol=1e-12)
    np.testing.assert_allclose(adjusted[0], [0.6, 1.8, 1.2], rtol=1e-12)
    np.testing.assert_allclose(adjusted[1], [-0.2, -2.6], rtol=1e-12)
    # Leaving prompt 0's second response out of the fit: (5 − 10) / (50 + 50) = −0.05; the
    # excluded response is adjusted all the same.
    include = [[True, False, True], [True, True]]
    adjusted, slope = judging.length_controlled_rewards(rewards, lengths, include)
    assert math.isclose(slope, -0.05, rel_tol=1e-12)
    np.testing.assert_allclose(adjusted[0], [1.5, 4.5, 3.0], rtol=1e-12)
    np.testing.assert_allclose(adjusted[1], [0.25, -1.25], rtol=1e-12)


def test_length_slope_is_the_regression_with_one_intercept_per_prompt():
    """The within-prompt slope equals least squares of reward on length plus a dummy per
    prompt (numpy lstsq); prompts with one included response add nothing to the fit."""
    rng = np.random.default_rng(3)
    sizes = [4, 2, 3, 4, 1]
    lengths = [rng.integers(1, 90, size=n).tolist() for n in sizes]
    rewards = [
        (rng.normal() - 0.03 * np.asarray(n) + rng.normal(size=len(n))).tolist() for n in lengths
    ]
    _, slope = judging.length_controlled_rewards(rewards, lengths)
    rows = [
        (k, n, r)
        for k, (ns, rs) in enumerate(zip(lengths, rewards, strict=True))
        for n, r in zip(ns, rs, strict=True)
    ]
    rows = [row for row in rows if sizes[row[0]] > 1]
    design = np.zeros((len(rows), 1 + len(sizes)))
    for i, (k, n, _) in enumerate(rows):
        design[i, 0], design[i, 1 + k] = n, 1.0
    keep = design.any(0)
    coef = np.linalg.lstsq(design[:, keep], np.asarray([r for *_, r in rows]), rcond=None)[0]
    assert math.isclose(slope, coef[0], rel_tol=1e-9)


def test_length_slope_skips_prompts_without_two_included_responses_and_small_spreads():
    # A first prompt with one response adds nothing and does not end the fit; lengths one
    # token apart (Σ(n − n̄)² = 1/2) still set the slope: (−0.2·(−0.5) + 0.2·0.5) / 0.5.
    adjusted, slope = judging.length_controlled_rewards([[9.0], [1.0, 1.4]], [[50], [3, 4]])
    assert math.isclose(slope, 0.4, rel_tol=1e-12)
    np.testing.assert_allclose(adjusted[0], [9.0 - 20.0], rtol=1e-12)
    np.testing.assert_allclose(adjusted[1], [1.0 - 1.2, 1.4 - 1.6], rtol=1e-12)
    with pytest.raises(ValueError):  # include flags for fewer prompts than the rewards
        judging.length_controlled_rewards(
            [[1.0, 2.0], [3.0, 4.0]], [[1, 2], [3, 4]], [[True, True]]
        )


def test_length_control_without_length_differences_changes_nothing():
    rewards = [[0.5, -0.5], [2.0]]
    adjusted, slope = judging.length_controlled_rewards(rewards, [[7, 7], [3]])
    assert slope == 0.0 and adjusted == rewards
    with pytest.raises(ValueError, match="prompt 0: 2 rewards, 1 lengths"):
        judging.length_controlled_rewards([[1.0, 2.0]], [[3]])
    with pytest.raises(ValueError, match="2 prompts of rewards but 1 of lengths"):
        judging.length_controlled_rewards([[1.0], [2.0]], [[3]])
