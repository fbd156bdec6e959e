"""Judges: from candidate responses to preference pairs with a per-pair confidence.

Every judge scores ``(prompt, response)`` pairs; a pair maker turns two scores
into a labelled pair. Three kinds share that interface:

- SPA's implicit-reward judge (Kim et al., arXiv 2406.04412, Eq. 4-5): the policy
  judges its own samples by ``r(x,y) = β·(log π(y|x) − log π_init(y|x))`` with
  summed token log-probs recomputed by a forward pass (never the sampler's
  temperature-scaled ones), and ``p(y1 ≻ y2 | x) = σ(r(x,y1) − r(x,y2))``.
- reward-model judges (a scalar score per response);
- rule judges that check a response against a record's known answer, used as
  the gold judge of the demo and of evaluation.

The numerical functions here are pure; the judges that run models take their
log-prob function as an argument, so this module holds no model code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from jaxalign.instructions import InstructionChecker


def implicit_reward(policy_logps, reference_logps, beta: float, num_tokens=None):
    """``r(x, y) = β · (log π(y|x) − log π_ref(y|x))``; log-probs are per-response sums ``[N]``.

    With ``num_tokens`` (an option beyond SPA, which sums) the log-ratio is divided
    by the response length: on the policy's own samples every token adds about the
    per-token KL to the sum, so summed rewards favour longer responses.
    """
    reward = beta * (policy_logps - reference_logps)
    if num_tokens is not None:
        reward = reward / np.maximum(np.asarray(num_tokens), 1)
    return reward


def length_controlled_rewards(
    rewards: Sequence[Sequence[float]],
    lengths: Sequence[Sequence[int]],
    include: Sequence[Sequence[bool]] | None = None,
) -> tuple[list[list[float]], float]:
    """Rewards with their length trend taken out: ``r'_kj = r_kj − b·n_kj`` (beyond SPA).

    ``rewards[k][j]``, ``lengths[k][j]``: candidate ``j`` of prompt ``k`` and its token
    count. ``b`` is the within-prompt least-squares slope of reward on length over the
    round's candidates,

        b = Σ_k Σ_j (r_kj − r̄_k)(n_kj − n̄_k) / Σ_k Σ_j (n_kj − n̄_k)²,

    with ``r̄_k``, ``n̄_k`` the means over prompt ``k``'s included candidates (``include``,
    default all; a prompt with fewer than two adds nothing), so lengths that differ between
    prompts for the prompts' own reasons do not set it. Subtracting a term linear in the
    length is the length control of length-controlled win rates (Dubois et al., arXiv
    2404.04475) and of R-DPO (Park et al., arXiv 2403.19159): the summed implicit reward
    moves by about the per-token log-ratio with every token, so without it a round's pairs
    are decided by length as much as by content. Within one prompt, the adjusted reward
    orders responses of equal length as ``r`` does. Returns ``(adjusted rewards, b)``;
    ``b = 0`` when no included lengths differ.
    """
    if len(rewards) != len(lengths):
        raise ValueError(f"{len(rewards)} prompts of rewards but {len(lengths)} of lengths")
    include = include if include is not None else [[True] * len(r) for r in rewards]
    numerator = denominator = 0.0
    for k, (rs, ns, keep) in enumerate(zip(rewards, lengths, include, strict=True)):
        if not len(rs) == len(ns) == len(keep):
            raise ValueError(
                f"prompt {k}: {len(rs)} rewards, {len(ns)} lengths, {len(keep)} include flags"
            )
        r = np.asarray([x for x, m in zip(rs, keep, strict=True) if m], np.float64)
        n = np.asarray([x for x, m in zip(ns, keep, strict=True) if m], np.float64)
        if len(r) < 2:
            continue
        numerator += float(np.dot(r - r.mean(), n - n.mean()))
        denominator += float(np.sum((n - n.mean()) ** 2))
    slope = numerator / denominator if denominator > 0 else 0.0
    adjusted = [
        [float(r) - slope * float(n) for r, n in zip(rs, ns, strict=True)]
        for rs, ns in zip(rewards, lengths, strict=True)
    ]
    return adjusted, slope


def preference_probability(reward_a, reward_b):
    """Bradley-Terry ``p(a ≻ b) = σ(r_a − r_b)``, computed stably for large margins."""
    diff = np.asarray(reward_a, np.float64) - np.asarray(reward_b, np.float64)
    return np.exp(-np.logaddexp(0.0, -diff))


class ResponseScorer(Protocol):
    """Anything that scores responses: ``scores[i]`` for ``(prompts[i], responses[i])``."""

    def __call__(
        self, prompts: Sequence, responses: Sequence[str], records: Sequence[dict] | None = None
    ) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One sampled response, as the sampler returned it."""

    text: str
    finished: bool = True  # ended with EOS (or a stop string)
    num_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class JudgedPair:
    """A labelled pair: ``margin = r_chosen − r_rejected`` and ``p = σ(margin)``, both from
    the rewards (``margin ≥ 0``), unless a rule decided the label (``rule``; then ``p = 1``
    and the margin may be negative)."""

    id: str
    prompt: object
    chosen: str
    rejected: str
    reward_chosen: float
    reward_rejected: float
    margin: float
    p: float
    chosen_eos: bool = True  # the response ended by itself (EOS or a stop string)
    rejected_eos: bool = True
    rule: str | None = None  # set when a rule, not the rewards, decided the label
    chosen_index: int | None = None  # which of the prompt's candidates each side is
    rejected_index: int | None = None

    def to_record(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PairCounts:
    """What happened to each candidate pair; ``considered = kept + sum(skipped)``."""

    considered: int = 0
    kept: int = 0
    identical: int = 0
    empty: int = 0
    truncated: int = 0
    tied: int = 0
    below_keep_fraction: int = 0  # labelled, then left out for a small margin (most_confident)
    by_rule: int = 0  # kept pairs whose label a rule decided (not a skip reason)

    @property
    def skipped(self) -> int:
        return self.identical + self.empty + self.truncated + self.tied + self.below_keep_fraction


TRUNCATED_POLICIES = ("keep", "skip", "reject")


def _distinct(indices: Sequence[int], candidates: Sequence[Candidate]) -> list[int]:
    """``indices`` without later candidates whose text repeats an earlier one's."""
    seen, kept = set(), []
    for i in indices:
        text = candidates[i].text.strip()
        if text not in seen:
            seen.add(text)
            kept.append(i)
    return kept


def select_pair(
    candidates: Sequence[Candidate], rewards: Sequence[float], truncated_policy: str = "keep"
) -> tuple[int, int, str | None] | str:
    """Which two of one prompt's candidates form its pair: ``(chosen, rejected, rule)``, or
    the reason there is none (``"empty"``, ``"identical"``, ``"truncated"``, ``"tied"``).

    The pair is the highest-reward candidate against the lowest-reward one among distinct,
    non-empty responses (with two samples per prompt, as in SPA, just those two; with more,
    the SPA authors' ``min_max`` selection). Ties between equal rewards go to the earlier
    candidate, so the result depends only on the candidates and their rewards.
    ``truncated_policy`` says what happens to a response cut at the token limit (no EOS):

    - ``"keep"`` (the paper): it competes like any other;
    - ``"skip"``: it is left out, and a prompt needs two finished responses to form a pair;
    - ``"reject"``: a finished response always beats a cut one (an unfinished answer is an
      incomplete answer): with both kinds present, the pair is the best finished response
      against the worst cut one, decided by that rule (``rule = "finished_over_truncated"``);
      with only cut responses, the prompt forms no pair.
    """
    if truncated_policy not in TRUNCATED_POLICIES:
        raise ValueError(
            f"truncated_policy must be one of {', '.join(TRUNCATED_POLICIES)}, "
            f"got {truncated_policy!r}"
        )
    if len(candidates) != len(rewards):
        raise ValueError(f"{len(candidates)} candidates but {len(rewards)} rewards")
    usable = [i for i, c in enumerate(candidates) if c.text.strip()]
    if len(usable) < 2:
        return "empty"
    usable = _distinct(usable, candidates)
    if len(usable) < 2:
        return "identical"
    finished = [i for i in usable if candidates[i].finished]
    cut = [i for i in usable if not candidates[i].finished]
    if truncated_policy == "skip" or (truncated_policy == "reject" and not cut):
        usable = finished
    elif truncated_policy == "reject":
        if not finished:
            return "truncated"
        best = max(finished, key=lambda i: (rewards[i], -i))
        worst = min(cut, key=lambda i: (rewards[i], i))
        return best, worst, "finished_over_truncated"
    if len(usable) < 2:
        return "truncated"
    best = max(usable, key=lambda i: (rewards[i], -i))
    worst = min(usable, key=lambda i: (rewards[i], i))
    if rewards[best] == rewards[worst]:
        return "tied"
    return best, worst, None


def label_pair(
    pair_id: str, prompt, a: Candidate, b: Candidate, reward_a: float, reward_b: float
) -> JudgedPair | None:
    """Labels a pair by reward: the higher-reward response is ``chosen``.

    The label depends only on the two (response, reward) couples, never on the
    order they were given in; an exact tie has no label and returns None.
    """
    if reward_a == reward_b:
        return None
    (chosen, r_c), (rejected, r_r) = sorted(
        [(a, float(reward_a)), (b, float(reward_b))], key=lambda t: -t[1]
    )
    return _judged(pair_id, prompt, chosen, rejected, r_c, r_r)


def _judged(
    pair_id, prompt, chosen: Candidate, rejected: Candidate, r_c, r_r, rule=None, indices=None
):
    margin = float(r_c) - float(r_r)
    return JudgedPair(
        id=pair_id,
        prompt=prompt,
        chosen=chosen.text,
        rejected=rejected.text,
        reward_chosen=float(r_c),
        reward_rejected=float(r_r),
        margin=margin,
        # A pair decided by a rule is certain; otherwise Bradley-Terry on the rewards.
        p=1.0 if rule else float(preference_probability(r_c, r_r)),
        chosen_eos=chosen.finished,
        rejected_eos=rejected.finished,
        rule=rule,
        chosen_index=None if indices is None else indices[0],
        rejected_index=None if indices is None else indices[1],
    )


def make_pairs(
    ids: Sequence[str],
    prompts: Sequence,
    candidates: Sequence[Sequence[Candidate]],
    rewards: Sequence[Sequence[float]],
    *,
    truncated_policy: str = "keep",
) -> tuple[list[JudgedPair], PairCounts]:
    """One labelled pair per prompt from its candidates and their rewards (:func:`select_pair`).

    Returns the pairs and the counts of what was kept and why the rest was skipped.
    """
    counts = PairCounts()
    pairs = []
    for pid, prompt, cands, rs in zip(ids, prompts, candidates, rewards, strict=True):
        if len(cands) < 2:
            raise ValueError(f"prompt {pid}: need 2 candidates to form a pair, got {len(cands)}")
        counts.considered += 1
        picked = select_pair(cands, [float(r) for r in rs], truncated_policy)
        if isinstance(picked, str):
            setattr(counts, picked, getattr(counts, picked) + 1)
            continue
        i, j, rule = picked
        counts.kept += 1
        counts.by_rule += int(rule is not None)
        pairs.append(_judged(pid, prompt, cands[i], cands[j], rs[i], rs[j], rule, (i, j)))
    return pairs, counts


def most_confident(pairs: Sequence[JudgedPair], fraction: float) -> list[JudgedPair]:
    """The ``fraction`` of ``pairs`` with the largest judged margins, in their original order
    (pairs decided by a rule count as most confident). ``fraction = 1`` keeps all."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    keep = math.ceil(fraction * len(pairs))
    ranked = sorted(range(len(pairs)), key=lambda k: (pairs[k].rule is None, -pairs[k].margin, k))
    chosen = set(ranked[:keep])
    return [p for k, p in enumerate(pairs) if k in chosen]


# ----------------------------------------------------------------------------- rule judges

_WORD = re.compile(r"[\w']+", re.UNICODE)


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


@dataclasses.dataclass(frozen=True)
class AnswerChecker:
    """Gold judge for short factual questions whose records carry ``answer``.

    ``score = correct + concise`` in {0, 1, 2}: ``correct`` is 1 when one of the
    record's accepted answers appears as a whole word sequence in the response;
    ``concise`` is 1 when the response ended by itself (EOS) within
    ``max_words`` words. This is the demo's notion of a better answer: right,
    short and complete.
    """

    max_words: int = 25

    def correct(self, response: str, answers: Sequence[str]) -> bool:
        text = f" {_normalise(response)} "
        return any(f" {_normalise(a)} " in text for a in answers if _normalise(a))

    def concise(self, response: str, finished: bool = True) -> bool:
        return finished and 0 < len(_WORD.findall(response)) <= self.max_words

    def __call__(self, prompts, responses, records=None, finished=None) -> np.ndarray:
        if records is None:
            raise ValueError("AnswerChecker needs the prompt records (with their 'answer' field)")
        finished = [True] * len(responses) if finished is None else finished
        scores = []
        for i, (resp, rec, fin) in enumerate(zip(responses, records, finished, strict=True)):
            answers = rec.get("answer")
            if not answers:
                raise ValueError(
                    f"record {i} (id {rec.get('id')!r}) has no 'answer' field to check"
                )
            answers = [answers] if isinstance(answers, str) else answers
            scores.append(float(self.correct(resp, answers)) + float(self.concise(resp, fin)))
        return np.asarray(scores, np.float32)


RULE_JUDGES: dict[str, Callable[[], ResponseScorer]] = {
    "demo-checker": AnswerChecker,
    "instruction-checker": InstructionChecker,  # verifiable instructions (IFEval style)
}


def get_rule_judge(name: str) -> ResponseScorer:
    try:
        return RULE_JUDGES[name]()
    except KeyError:
        raise ValueError(
            f"unknown judge {name!r}; registered rule judges: {', '.join(sorted(RULE_JUDGES))}"
        ) from None


def gold_agreement(gold_chosen: np.ndarray, gold_rejected: np.ndarray) -> tuple[float, int]:
    """Fraction of pairs whose label the gold judge agrees with, over pairs it separates.

    Returns ``(agreement, n_separated)``; agreement is NaN when the gold judge
    ties every pair.
    """
    diff = np.asarray(gold_chosen) - np.asarray(gold_rejected)
    separated = diff != 0
    n = int(separated.sum())
    return (float((diff[separated] > 0).mean()) if n else float("nan")), n
