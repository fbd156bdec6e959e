"""Verifiable instructions: constraints a response can be checked against, and their judge.

An instruction-following prompt (in the style of IFEval, Zhou et al. 2023, "Instruction-
Following Evaluation for Large Language Models", arXiv 2311.07911) is a request plus one
or more *constraints* with a deterministic check: a word or sentence limit, keywords to
include or avoid, a format (bullet list, title, postscript, JSON), letter case, an exact
ending, and so on. A prompt record carries its constraints as data::

    {"id": "...", "prompt": "Describe a lighthouse. Answer in fewer than 40 words.",
     "constraints": [{"type": "max_words", "n": 40}]}

and :class:`InstructionChecker`, the gold judge, scores a response by the fraction of
its record's constraints that hold, in ``[0, 1]``. Where a constraint is one of IFEval's
(named in each checker's docstring), the check follows IFEval's reference implementation,
so scores are comparable; the sentence splitter is a plain rule (IFEval's uses NLTK's
Punkt model, which needs a download).

A response cut at the token limit is judged on its text as it is, as IFEval does; every
length limit here is below what a response that ran to the limit can hold, so such a
response fails the limits.

Everything here is pure Python over strings.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+")  # IFEval's word tokenizer: nltk RegexpTokenizer(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")


def count_words(text: str) -> int:
    """Words as IFEval counts them: maximal runs of ``\\w`` characters."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences: text split after ``.``, ``!`` or ``?`` (and closing quotes or brackets)
    followed by white space; bullet lines and paragraphs end a sentence too."""
    pieces = []
    for line in re.split(r"\n\s*\n|\n(?=\s*[*\-•]|\s*\d+[.)])", text):
        pieces += [s for s in _SENTENCE_END.split(line.strip()) if s.strip()]
    return pieces


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def _strip_quotes(text: str) -> str:
    return text.strip().strip('"').strip()


# ----------------------------------------------------------------------------- the checks
# Each check takes the response text and the constraint's parameters.


def _max_words(text: str, n: int) -> bool:
    """IFEval ``length_constraints:number_words`` with relation "less than"."""
    return count_words(text) < n


def _min_words(text: str, n: int) -> bool:
    """IFEval ``length_constraints:number_words`` with relation "at least"."""
    return count_words(text) >= n


def _max_sentences(text: str, n: int) -> bool:
    """IFEval ``length_constraints:number_sentences`` ("at most" read as "less than n+1")."""
    return 0 < count_sentences(text) <= n


def _include_keywords(text: str, keywords: Sequence[str]) -> bool:
    """IFEval ``keywords:existence``: every keyword appears (case-insensitive search)."""
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def _forbidden_words(text: str, words: Sequence[str]) -> bool:
    """IFEval ``keywords:forbidden_words``: no word appears as a whole word (any case)."""
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE) for w in words
    )


def _keyword_frequency(text: str, keyword: str, n: int) -> bool:
    """IFEval ``keywords:frequency`` with relation "at least": ``keyword`` ≥ ``n`` times."""
    return len(re.findall(re.escape(keyword), text, flags=re.IGNORECASE)) >= n


def _lowercase(text: str) -> bool:
    """IFEval ``change_case:english_lowercase`` (without its language check)."""
    return text.islower()


def _uppercase(text: str) -> bool:
    """IFEval ``change_case:english_capital`` (without its language check)."""
    return text.isupper()


def _no_comma(text: str) -> bool:
    """IFEval ``punctuation:no_comma``."""
    return "," not in text


def _end_phrase(text: str, phrase: str) -> bool:
    """IFEval ``startend:end_checker``: the response ends with ``phrase`` (any case)."""
    return _strip_quotes(text).lower().endswith(phrase.strip().lower())


def _start_word(text: str, word: str) -> bool:
    """The response's first word is ``word`` (any case, punctuation ignored)."""
    words = _WORD.findall(text)
    return bool(words) and words[0].lower() == word.lower()


def _title(text: str) -> bool:
    """IFEval ``detectable_format:title``: a title wrapped in ``<<...>>``."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def _bullet_points(text: str, n: int) -> bool:
    """IFEval ``detectable_format:number_bullet_lists``: exactly ``n`` markdown bullets
    (lines starting with ``*`` or ``-``)."""
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == n


def _postscript(text: str, marker: str = "P.S.") -> bool:
    """IFEval ``detectable_content:postscript`` with the marker ``P.S.``."""
    if marker.lower() == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def _quotation(text: str) -> bool:
    """IFEval ``startend:quotation``: the whole response is wrapped in double quotes."""
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _json_format(text: str) -> bool:
    """IFEval ``detectable_format:json_format``: the response (fences removed) is JSON."""
    value = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _placeholders(text: str, n: int) -> bool:
    """IFEval ``detectable_content:number_placeholders``: at least ``n`` ``[placeholders]``."""
    return len(re.findall(r"\[.*?\]", text)) >= n


def _highlighted_sections(text: str, n: int) -> bool:
    """IFEval ``detectable_format:number_highlighted_sections``: at least ``n`` sections
    highlighted as ``*text*`` or ``**text**``."""
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip())
    count += sum(
        1
        for h in re.findall(r"\*\*[^\n\*]*\*\*", text)
        if h.removeprefix("**").removesuffix("**").strip()
    )
    return count >= n


def _ends_with_question(text: str) -> bool:
    """The response's last character (closing quotes aside) is a question mark."""
    return _strip_quotes(text).endswith("?")


@dataclasses.dataclass(frozen=True)
class ConstraintType:
    """One kind of verifiable constraint: its check and the sentence that asks for it."""

    name: str
    check: Callable[..., bool]
    describe: Callable[..., str]
    params: tuple[str, ...] = ()  # the parameters a constraint of this type carries


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _words(items: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


CONSTRAINTS: dict[str, ConstraintType] = {
    c.name: c
    for c in (
        ConstraintType(
            "max_words", _max_words, lambda n: f"Answer in fewer than {n} words.", ("n",)
        ),
        ConstraintType(
            "min_words", _min_words, lambda n: f"Answer with at least {n} words.", ("n",)
        ),
        ConstraintType(
            "max_sentences",
            _max_sentences,
            lambda n: "Answer in one sentence." if n == 1 else f"Answer in at most {n} sentences.",
            ("n",),
        ),
        ConstraintType(
            "include_keywords",
            _include_keywords,
            lambda keywords: (
                f"Include the {_plural('word', len(keywords))} {_words(keywords)} in your response."
            ),
            ("keywords",),
        ),
        ConstraintType(
            "forbidden_words",
            _forbidden_words,
            lambda words: (
                f"Do not use the {_plural('word', len(words))} "
                f"{_words(words).replace(' and ', ' or ')}."
            ),
            ("words",),
        ),
        ConstraintType(
            "keyword_frequency",
            _keyword_frequency,
            lambda keyword, n: f'Use the word "{keyword}" at least {n} times.',
            ("keyword", "n"),
        ),
        ConstraintType(
            "lowercase",
            _lowercase,
            lambda: "Write your whole response in lowercase letters, with no capital letters.",
        ),
        ConstraintType(
            "uppercase",
            _uppercase,
            lambda: "Write your whole response in capital letters.",
        ),
        ConstraintType("no_comma", _no_comma, lambda: "Do not use any commas."),
        ConstraintType(
            "end_phrase",
            _end_phrase,
            lambda phrase: (
                f'End your response with the exact phrase "{phrase}"'
                + ("" if phrase[-1:] in ".!?" else ".")
            ),
            ("phrase",),
        ),
        ConstraintType(
            "start_word",
            _start_word,
            lambda word: f'Start your response with the word "{word}".',
            ("word",),
        ),
        ConstraintType(
            "title",
            _title,
            lambda: (
                "Give your answer a title wrapped in double angular brackets, such as <<my title>>."
            ),
        ),
        ConstraintType(
            "bullet_points",
            _bullet_points,
            lambda n: (
                f"Answer with exactly {n} bullet {_plural('point', n)}, each on its own line "
                "starting with *."
            ),
            ("n",),
        ),
        ConstraintType(
            "postscript",
            _postscript,
            lambda: "At the end of your response, add a postscript starting with P.S.",
        ),
        ConstraintType(
            "quotation",
            _quotation,
            lambda: "Wrap your entire response in double quotation marks.",
        ),
        ConstraintType(
            "json_format",
            _json_format,
            lambda: "Write your entire response as JSON.",
        ),
        ConstraintType(
            "placeholders",
            _placeholders,
            lambda n: (
                f"Include at least {n} {_plural('placeholder', n)} in square brackets, "
                "such as [name]."
            ),
            ("n",),
        ),
        ConstraintType(
            "highlighted_sections",
            _highlighted_sections,
            lambda n: (
                f"Highlight at least {n} {_plural('part', n)} of your answer with markdown, "
                "such as *highlighted part*."
            ),
            ("n",),
        ),
        ConstraintType(
            "ends_with_question",
            _ends_with_question,
            lambda: "End your response with a question.",
        ),
    )
}


class ConstraintError(ValueError):
    """A constraint record that cannot be checked; the message names the record and field."""


def _arguments(constraint: Mapping[str, Any], where: str) -> tuple[ConstraintType, dict]:
    if not isinstance(constraint, Mapping) or "type" not in constraint:
        raise ConstraintError(f"{where}: a constraint must be a mapping with a 'type'")
    kind = CONSTRAINTS.get(constraint["type"])
    if kind is None:
        raise ConstraintError(
            f"{where}: unknown constraint type {constraint['type']!r}; known: "
            + ", ".join(sorted(CONSTRAINTS))
        )
    missing = [p for p in kind.params if p not in constraint]
    if missing:
        raise ConstraintError(f"{where}: constraint {kind.name!r} needs {', '.join(missing)}")
    return kind, {p: constraint[p] for p in kind.params}


def check(constraint: Mapping[str, Any], response: str, where: str = "constraint") -> bool:
    """Whether ``response`` satisfies one constraint record ``{"type": ..., params...}``."""
    kind, args = _arguments(constraint, where)
    return bool(kind.check(response, **args))


def describe(constraint: Mapping[str, Any], where: str = "constraint") -> str:
    """The instruction sentence that asks for ``constraint``."""
    kind, args = _arguments(constraint, where)
    return kind.describe(**args)


def constraint_results(constraints: Sequence[Mapping], response: str, where: str = "") -> list:
    """``[bool]``: which of ``constraints`` the response satisfies, in order."""
    return [check(c, response, f"{where}constraints[{i}]") for i, c in enumerate(constraints)]


def instruction_score(constraints: Sequence[Mapping], response: str, where: str = "") -> float:
    """The fraction of ``constraints`` satisfied, in ``[0, 1]`` (IFEval's instruction-level
    accuracy for one prompt)."""
    if not constraints:
        raise ConstraintError(f"{where or 'record'}: no constraints to check")
    results = constraint_results(constraints, response, where)
    return sum(results) / len(results)


@dataclasses.dataclass(frozen=True)
class InstructionChecker:
    """Gold judge for verifiable-instruction prompts: each record's ``constraints`` field.

    ``score = satisfied / len(constraints)`` in ``[0, 1]``. ``finished`` is accepted for the
    rule-judge interface and not used: an unfinished response is checked as written.
    """

    def __call__(self, prompts, responses, records=None, finished=None) -> np.ndarray:
        if records is None:
            raise ValueError("InstructionChecker needs the prompt records (their 'constraints')")
        scores = []
        for i, (response, record) in enumerate(zip(responses, records, strict=True)):
            where = f"record {i} (id {record.get('id')!r}): "
            if "constraints" not in record:
                raise ConstraintError(f"{where}no 'constraints' field to check")
            scores.append(instruction_score(record["constraints"], response, where))
        return np.asarray(scores, np.float32)
