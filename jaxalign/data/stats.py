"""Token statistics and rendered examples of canonical records (``jaxalign data inspect``).

Lengths are counted the way training tokenises (``data/pairs.py``): a prompt through
``Tokenizer.encode_prompt`` (chat template, generation prompt included), a response
through ``Tokenizer.encode_response`` (text + end-of-turn id).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def prompt_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a string becomes one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def conversation(record: dict, side: str = "chosen") -> list[dict]:
    """The prompt's messages followed by the ``side`` response as the assistant's turn."""
    return [*prompt_messages(record["prompt"]), {"role": "assistant", "content": record[side]}]


def render_example(record: dict, tokenizer, side: str = "chosen") -> str:
    """The chat-templated text of prompt + ``side`` response (what the model is trained on)."""
    return tokenizer.apply_chat_template(conversation(record, side), add_generation_prompt=False)


def encode_conversation(record: dict, tokenizer, side: str = "chosen") -> list[int]:
    """Token ids of ``render_example`` (the template's own special tokens, nothing added)."""
    return tokenizer.encode(render_example(record, tokenizer, side))


@dataclasses.dataclass
class TokenLengths:
    """Per-record token counts: ``prompt``, ``chosen``, ``rejected`` (the last two may be empty)."""

    prompt: list[int] = dataclasses.field(default_factory=list)
    chosen: list[int] = dataclasses.field(default_factory=list)
    rejected: list[int] = dataclasses.field(default_factory=list)


def token_lengths(
    records: Sequence[dict], tokenizer, use_chat_template: bool = True
) -> TokenLengths:
    """Token counts of each record's prompt and (for pairs) responses."""
    out = TokenLengths()
    for record in records:
        out.prompt.append(len(tokenizer.encode_prompt(record["prompt"], use_chat_template)))
        if "chosen" in record:
            out.chosen.append(len(tokenizer.encode_response(record["chosen"])))
            out.rejected.append(len(tokenizer.encode_response(record["rejected"])))
    return out


def truncation_counts(
    lengths: TokenLengths, max_prompt_tokens: int, max_response_tokens: int
) -> dict[str, int]:
    """How many prompts / responses exceed their limits (they would be cut in training)."""
    return {
        "prompt": sum(n > max_prompt_tokens for n in lengths.prompt),
        "chosen": sum(n > max_response_tokens for n in lengths.chosen),
        "rejected": sum(n > max_response_tokens for n in lengths.rejected),
    }


def histogram(values: Sequence[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """``(low, high, count)`` rows counting integers ``low <= v < high`` over equal-width bins.

    The width is ``ceil((max - min + 1) / bins)`` so every bin spans whole token counts;
    at most ``bins`` rows, the first starting at ``min``.
    """
    if not len(values):
        return []
    v = np.asarray(values, dtype=np.int64)
    low, high = int(v.min()), int(v.max())
    width = max(1, -(-(high - low + 1) // bins))
    counts = np.bincount((v - low) // width)
    return [(low + i * width, low + (i + 1) * width, int(c)) for i, c in enumerate(counts)]


def format_histogram(name: str, values: Sequence[int], bins: int = 10, width: int = 40) -> str:
    """A text histogram with min/mean/max and a bar per bin."""
    if not len(values):
        return f"{name}: no values"
    v = np.asarray(values)
    lines = [f"{name}: n={len(v)} min={v.min()} mean={v.mean():.1f} max={v.max()}"]
    rows = histogram(values, bins)
    top = max(c for _, _, c in rows)
    for low, high, count in rows:
        bar = "#" * (round(width * count / top) if top else 0)
        lines.append(f"  [{low:7d}, {high:7d}) {count:7d} {bar}")
    return "\n".join(lines)
