"""Evaluation: win rates under a gold judge, KL to a reference, and answer export.

**Win rate.** A comparison gives each prompt one outcome for model A against
model B: a win (1), a tie (½) or a loss (0), decided by the gold judge's scores
of the two responses. The win rate is the mean outcome; its 95% interval is the
normal approximation ``mean ± 1.96·s/√n`` (s the sample standard deviation of
the outcomes), clipped to [0, 1] — the form AlpacaEval reports for its win rates.

**Gold judges** compare a model's answers with a baseline's, prompt by prompt,
and return one score per answer (:class:`PairJudge`). A judge is named by a spec
string (:func:`make_judge`): ``NAME`` or ``rule:NAME`` for a rule judge of
:data:`jaxalign.judging.RULE_JUDGES`, ``verdicts:FILE.jsonl`` for verdicts an
external judge exported (format in :func:`read_verdicts`). New kinds (a reward
model) register a constructor in :data:`JUDGE_KINDS`.

**KL to the reference.** For ``y ~ π_A(·|x)``,
``KL(π_A ‖ π_B) = E_x E_y [log π_A(y|x) − log π_B(y|x)]``; its Monte-Carlo
estimate is the mean of that difference over sampled responses, with summed
token log-probs recomputed by a forward pass
(:func:`jaxalign.scoring.response_logprobs`) on the exact sampled tokens. The
samples must come from ``π_A`` itself (temperature 1, no top-k/top-p/min-p);
greedy or filtered answers would bias it.

**Export** writes answers in the input formats of AlpacaEval 2.0
(:func:`alpaca_eval_outputs`) and of FastChat's MT-Bench ``llm_judge``
(:func:`mt_bench_answers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jaxalign import judging
from jaxalign.judging import Candidate

# ----------------------------------------------------------------------------- win rate


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


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    resamples: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` paired units.

    Each resample draws ``n`` unit indices with replacement (the same draw for every
    array the statistic reads, which is what makes it *paired*: a prompt's outcomes under
    two models stay together) and evaluates ``statistic`` on them; the interval is the
    ``(1 ± level)/2`` quantiles of those values (Efron & Tibshirani 1993, ch. 13).
    """
    if n < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.asarray([statistic(rng.integers(0, n, n)) for _ in range(resamples)], np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    values, *, resamples: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-unit ``values [N]``.

    For a win rate pass the per-prompt outcomes (1 / ½ / 0); for the difference between
    two models pass the per-prompt differences of their outcomes (paired by prompt).
    """
    x = np.asarray(values, np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    return bootstrap_statistic(
        lambda idx: float(x[idx].mean()), x.size, resamples=resamples, level=level, seed=seed
    )


# ----------------------------------------------------------------------------- judges


class PairJudge(Protocol):
    """Scores a model's and a baseline's answers to the same prompts.

    ``records[i]`` is prompt ``i``'s record (``id``, ``prompt`` and whatever the
    judge needs, e.g. ``answer``); returns ``(model_scores [N], baseline_scores [N])``,
    higher is better. Only the comparison of the two scores of a prompt matters.
    """

    name: str

    def compare(
        self,
        records: Sequence[dict],
        answers: Sequence[Candidate],
        baseline_answers: Sequence[Candidate],
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class RuleJudge:
    """A rule judge of :data:`jaxalign.judging.RULE_JUDGES` scoring each answer on its own."""

    rule: str

    @property
    def name(self) -> str:
        return f"rule:{self.rule}"

    def compare(self, records, answers, baseline_answers):
        scorer = judging.get_rule_judge(self.rule)
        return score_answers(scorer, records, answers), score_answers(
            scorer, records, baseline_answers
        )


def score_answers(scorer, records: Sequence[dict], answers: Sequence[Candidate]) -> np.ndarray:
    """``[N]`` scores of each record's answer by a per-response scorer (rule or reward model)."""
    return np.asarray(
        scorer(
            [r["prompt"] for r in records],
            [c.text for c in answers],
            records,
            finished=[c.finished for c in answers],
        ),
        np.float64,
    )


@dataclasses.dataclass
class RewardJudge:
    """A reward model scoring each answer on its own; the higher reward wins.

    ``folder``: a local Hugging Face sequence-classification model with its
    tokenizer (:func:`jaxalign.reward_judge.load_reward_judge`), loaded on first use.
    """

    folder: str
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 1024
    batch_size: int = 16
    _scorer: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"reward:{self.folder}"

    def compare(self, records, answers, baseline_answers):
        if self._scorer is None:
            from jaxalign.reward_judge import load_reward_judge

            self._scorer = load_reward_judge(
                self.folder,
                batch_size=self.batch_size,
                max_prompt_tokens=self.max_prompt_tokens,
                max_response_tokens=self.max_response_tokens,
            )
        return score_answers(self._scorer, records, answers), score_answers(
            self._scorer, records, baseline_answers
        )


WINNER_SCORES = {"model": (1.0, 0.0), "baseline": (0.0, 1.0), "tie": (0.0, 0.0)}


def read_verdicts(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """``{id: (model_score, baseline_score)}`` from an external judge's verdict file.

    The file is JSONL, one line per prompt, in either form (they may be mixed):

    - ``{"id": ..., "winner": "model" | "baseline" | "tie"}`` — a pairwise verdict,
      read as scores (1, 0), (0, 1) or (0, 0);
    - ``{"id": ..., "score": float, "baseline_score": float}`` — one score per
      response (higher is better), e.g. a 1-10 MT-Bench grade.

    ``id`` is the prompt record's id, as written to ``answers.jsonl`` by
    ``jaxalign eval``. A repeated id, a bad winner or a non-numeric score is an
    error naming the line.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verdict file {path} not found")
    out: dict[str, tuple[float, float]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{where}: a verdict needs an 'id' (the prompt record's id)")
            key = str(record["id"])
            if key in out:
                raise ValueError(f"{where}: id {record['id']!r} has a second verdict; keep one")
            if "winner" in record:
                winner = record["winner"]
                if winner not in WINNER_SCORES:
                    raise ValueError(
                        f"{where}: field 'winner' must be one of {', '.join(WINNER_SCORES)}, "
                        f"got {winner!r}"
                    )
                out[key] = WINNER_SCORES[winner]
                continue
            scores = []
            for field in ("score", "baseline_score"):
                value = record.get(field)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(
                        f"{where}: needs 'winner' (model, baseline or tie) or numeric 'score' "
                        f"and 'baseline_score'; field {field!r} is {value!r}"
                    )
                if not math.isfinite(value):
                    raise ValueError(f"{where}: field {field!r} is not finite ({value!r})")
                scores.append(float(value))
            out[key] = (scores[0], scores[1])
    return out


@dataclasses.dataclass(frozen=True)
class VerdictJudge:
    """Verdicts read back from a file (:func:`read_verdicts`); every prompt needs one."""

    path: str

    @property
    def name(self) -> str:
        return f"verdicts:{self.path}"

    def compare(self, records, answers, baseline_answers):
        verdicts = read_verdicts(self.path)
        missing = [r["id"] for r in records if str(r["id"]) not in verdicts]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise ValueError(
                f"{self.path}: no verdict for {len(missing)} of {len(records)} prompts "
                f"(ids {shown}{', ...' if len(missing) > 5 else ''}); judge every prompt"
            )
        pairs = np.asarray([verdicts[str(r["id"])] for r in records], np.float64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]


JUDGE_KINDS: dict[str, Callable[[str], PairJudge]] = {
    "rule": RuleJudge,
    "verdicts": VerdictJudge,
    "reward": RewardJudge,
}


def make_judge(spec: str) -> PairJudge:
    """A judge from ``KIND:ARG`` or a rule name.

    ``rule:demo-checker``, ``verdicts:v.jsonl`` (an external judge's verdicts) or
    ``reward:FOLDER`` (a local reward model).
    """
    kind, sep, arg = spec.partition(":")
    if sep and kind in JUDGE_KINDS:
        if not arg:
            raise ValueError(f"judge {spec!r}: give the {kind} judge an argument after ':'")
        if kind == "rule":
            judging.get_rule_judge(arg)  # fails early, listing the registered rules
        if kind == "reward" and not pathlib.Path(arg).is_dir():
            raise ValueError(
                f"judge {spec!r}: {arg} is not a folder holding a Hugging Face "
                "sequence-classification model and its tokenizer"
            )
        return JUDGE_KINDS[kind](arg)
    if spec in judging.RULE_JUDGES:
        return RuleJudge(spec)
    raise ValueError(
        f"unknown judge {spec!r}; use a rule judge ({', '.join(sorted(judging.RULE_JUDGES))}), "
        f"or KIND:ARG with KIND one of {', '.join(JUDGE_KINDS)} (e.g. verdicts:verdicts.jsonl, "
        "reward:path/to/reward_model)"
    )


# ----------------------------------------------------------------------------- lengths


def length_stats(answers: Sequence[Candidate]) -> dict[str, float]:
    """Mean/median words and tokens of the answers and the fraction that ended by themselves."""
    if not answers:
        return {}
    words = np.asarray([len(a.text.split()) for a in answers], np.float64)
    tokens = np.asarray([a.num_tokens for a in answers], np.float64)
    return {
        "mean_words": float(words.mean()),
        "median_words": float(np.median(words)),
        "mean_tokens": float(tokens.mean()),
        "max_tokens": int(tokens.max()),
        "finished_fraction": float(np.mean([a.finished for a in answers])),
    }


# ----------------------------------------------------------------------------- KL


@dataclasses.dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo ``KL(π_A ‖ π_B)`` from ``n`` samples of ``π_A``, in nats per response."""

    kl: float  # mean of log π_A(y|x) − log π_B(y|x)
    stderr: float  # s / √n, s the sample standard deviation of the differences
    n: int
    kl_per_token: float  # Σ differences / Σ response tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def kl_estimate(logp_model, logp_reference, num_tokens=None) -> KLEstimate:
    """``KL ≈ (1/n) Σ_i [log π_A(y_i|x_i) − log π_B(y_i|x_i)]`` for ``y_i ~ π_A(·|x_i)``.

    ``logp_model, logp_reference [n]`` are summed response log-probs; ``num_tokens [n]``
    (optional) gives the per-token figure. Single samples can be negative; the
    expectation is not.
    """
    a = np.asarray(logp_model, np.float64)
    b = np.asarray(logp_reference, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two log-prob vectors of equal length, got {a.shape}, {b.shape}")
    n = a.size
    if n == 0:
        return KLEstimate(float("nan"), float("nan"), 0, float("nan"))
    diff = a - b
    stderr = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    tokens = float(np.sum(num_tokens)) if num_tokens is not None else 0.0
    per_token = float(diff.sum() / tokens) if tokens > 0 else float("nan")
    return KLEstimate(float(diff.mean()), stderr, n, per_token)


# ----------------------------------------------------------------------------- export


def instruction_text(prompt) -> str:
    """The text of a single-turn prompt: the string, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("a chat prompt needs at least one user message to export")
    return users[-1]


def alpaca_eval_outputs(
    records: Sequence[Mapping], outputs: Sequence[str], generator: str
) -> list[dict]:
    """Rows of an AlpacaEval 2.0 ``model_outputs.json`` (a JSON list), one per prompt.

    Fields, as ``alpaca_eval evaluate --model_outputs`` reads them (it keeps the
    columns ``dataset, instruction, output, generator`` of each row):
    ``instruction`` (str, the prompt; AlpacaEval matches outputs to its reference
    outputs by this text), ``output`` (str, the model's answer), ``generator``
    (str, the model's name in the leaderboard), and ``dataset`` (str, the subset
    name such as ``helpful_base``) when the prompt record carries one.
    """
    rows = []
    for record, output in zip(records, outputs, strict=True):
        row = {"instruction": instruction_text(record["prompt"]), "output": output}
        row["generator"] = generator
        if isinstance(record.get("dataset"), str):
            row["dataset"] = record["dataset"]
        rows.append(row)
    return rows


def _question_id(record: Mapping):
    qid = record.get("question_id", record["id"])
    if isinstance(qid, str) and qid.strip().lstrip("-").isdigit():
        return int(qid)
    return qid


def mt_bench_answers(
    records: Sequence[Mapping],
    outputs: Sequence[str],
    model_id: str,
    tstamp: float | None = None,
) -> list[dict]:
    """Lines of a FastChat ``llm_judge`` answer file, ``model_answer/<model_id>.jsonl``.

    Fields, as ``fastchat/llm_judge/gen_model_answer.py`` writes them and
    ``gen_judgment.py`` reads them (``load_model_answers`` keys answers by
    ``question_id``; judges read ``choices[0]["turns"][t]``): ``question_id``
    (the record's ``question_id``, else its ``id``; integer-like ids become ints,
    as FastChat sorts answer files by ``int(question_id)``), ``answer_id`` (str,
    a stable hash of model, question and answer), ``model_id`` (str),
    ``choices`` (``[{"index": 0, "turns": [answer]}]``: one turn per answered
    user turn; answers here are single-turn) and ``tstamp`` (float, Unix time).
    """
    tstamp = time.time() if tstamp is None else float(tstamp)
    lines = []
    for record, output in zip(records, outputs, strict=True):
        qid = _question_id(record)
        digest = hashlib.sha1(json.dumps([model_id, qid, output]).encode()).hexdigest()[:22]
        lines.append(
            {
                "question_id": qid,
                "answer_id": digest,
                "model_id": model_id,
                "choices": [{"index": 0, "turns": [output]}],
                "tstamp": tstamp,
            }
        )
    return lines


EXPORT_FORMATS = ("alpaca_eval", "mt_bench")


def export_answers(
    fmt: str,
    out_dir: str | os.PathLike,
    records: Sequence[Mapping],
    outputs_by_model: Mapping[str, Sequence[str]],
) -> list[pathlib.Path]:
    """Writes each model's answers in format ``fmt``; returns the files written.

    ``alpaca_eval``: ``<out>/alpaca_eval/<name>/model_outputs.json`` per model
    (pass one as ``--model_outputs`` and another as ``--reference_outputs``);
    ``mt_bench``: ``<out>/mt_bench/model_answer/<name>.jsonl`` (FastChat's layout
    under ``data/mt_bench/``).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(
            f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    out_dir = pathlib.Path(out_dir)
    written = []
    for name, outputs in outputs_by_model.items():
        if fmt == "alpaca_eval":
            path = out_dir / "alpaca_eval" / name / "model_outputs.json"
            text = json.dumps(
                alpaca_eval_outputs(records, outputs, name), indent=1, ensure_ascii=False
            )
        else:
            path = out_dir / "mt_bench" / "model_answer" / f"{name}.jsonl"
            lines = mt_bench_answers(records, outputs, name)
            text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written
