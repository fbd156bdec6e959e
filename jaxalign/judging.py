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
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


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
    """A labelled pair; ``margin = r_chosen − r_rejected ≥ 0`` and ``p = σ(margin)``."""

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

    @property
    def skipped(self) -> int:
        return self.identical + self.empty + self.truncated + self.tied


def degenerate_reason(a: Candidate, b: Candidate, skip_truncated: bool) -> str | None:
    """Why a candidate pair cannot become a preference pair, or None.

    Identical responses carry no preference, and an empty response is not an
    answer; both are skipped. A response cut at the token limit without EOS is
    kept by default (the paper keeps them) or skipped when asked.
    """
    if not a.text.strip() or not b.text.strip():
        return "empty"
    if a.text.strip() == b.text.strip():
        return "identical"
    if skip_truncated and not (a.finished and b.finished):
        return "truncated"
    return None


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
    margin = r_c - r_r
    return JudgedPair(
        id=pair_id,
        prompt=prompt,
        chosen=chosen.text,
        rejected=rejected.text,
        reward_chosen=r_c,
        reward_rejected=r_r,
        margin=margin,
        p=float(preference_probability(r_c, r_r)),
        chosen_eos=chosen.finished,
        rejected_eos=rejected.finished,
    )


def make_pairs(
    ids: Sequence[str],
    prompts: Sequence,
    candidates: Sequence[Sequence[Candidate]],
    rewards: Sequence[Sequence[float]],
    *,
    skip_truncated: bool = False,
) -> tuple[list[JudgedPair], PairCounts]:
    """Turns each prompt's first two candidates and their rewards into a pair.

    Returns the pairs and the counts of what was kept and why the rest was skipped.
    """
    counts = PairCounts()
    pairs = []
    for pid, prompt, cands, rs in zip(ids, prompts, candidates, rewards, strict=True):
        if len(cands) < 2:
            raise ValueError(f"prompt {pid}: need 2 candidates to form a pair, got {len(cands)}")
        counts.considered += 1
        a, b = cands[0], cands[1]
        reason = degenerate_reason(a, b, skip_truncated)
        if reason is not None:
            setattr(counts, reason, getattr(counts, reason) + 1)
            continue
        pair = label_pair(pid, prompt, a, b, rs[0], rs[1])
        if pair is None:
            counts.tied += 1
            continue
        counts.kept += 1
        pairs.append(pair)
    return pairs, counts


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
