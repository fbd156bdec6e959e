"""Text preference records → tokenised, bucketed pair batches (layout: ``jaxalign.training``).

Each record ``{prompt, chosen, rejected}`` becomes two rows, prompt + response,
right-padded from column 0. Prompts longer than ``max_prompt_tokens`` lose
their *beginning* (the end of a prompt is what the response answers);
responses longer than ``max_response_tokens`` lose their end (and so their
EOS). Both truncations are counted. Rows are grouped into length buckets
(``jaxalign.data.buckets``, so a run compiles a handful of shapes), and the last batch of
a bucket is filled with weight-0 padding pairs.

Optional record fields: ``weight`` (default 1), ``smoothing`` (default 0),
``p`` (the judge's preference probability, default 1), ``chosen_eos`` /
``rejected_eos`` (False for a response that was cut at a sampling limit, so
no EOS is appended).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxalign.data.buckets import MIN_BUCKET, bucket_length


@dataclasses.dataclass
class PairReport:
    """What happened to every record: ``read = kept + skipped``."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    padding_pairs: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    buckets: dict[int, int] = dataclasses.field(default_factory=dict)  # length -> pairs

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        buckets = ", ".join(f"{t}: {n}" for t, n in sorted(self.buckets.items()))
        return (
            f"pairs: read {self.read} = kept {self.kept} + skipped {self.skipped} ({why}); "
            f"truncated prompts {self.truncated_prompts}, responses {self.truncated_responses}; "
            f"buckets {{{buckets}}}; padding pairs {self.padding_pairs}"
        )


def _tokenise(record, tokenizer, max_prompt_tokens, max_response_tokens, use_chat_template):
    """``(prompt_ids, chosen_ids, rejected_ids, prompt_cut, responses_cut)`` of one record."""
    prompt = tokenizer.encode_prompt(record["prompt"], use_chat_template=use_chat_template)
    prompt_cut = len(prompt) > max_prompt_tokens
    prompt = prompt[len(prompt) - max_prompt_tokens :] if prompt_cut else prompt
    responses, cuts = [], 0
    for side in ("chosen", "rejected"):
        ids = tokenizer.encode_response(record[side], add_eos=bool(record.get(f"{side}_eos", True)))
        if len(ids) > max_response_tokens:
            ids, cuts = ids[:max_response_tokens], cuts + 1
        responses.append(ids)
    return prompt, responses[0], responses[1], prompt_cut, cuts


def _pack(rows: list[tuple[int, list[int], list[int], list[int], dict]], length: int, pad_id: int):
    """One batch dict from ``(index, prompt, chosen, rejected, record)`` rows; ``index -1`` pads."""
    b = len(rows)
    batch = {
        "index": np.full(b, -1, np.int32),
        "weight": np.zeros(b, np.float32),
        "smoothing": np.zeros(b, np.float32),
        "p": np.ones(b, np.float32),
    }
    for side in ("chosen", "rejected"):
        batch[f"{side}_ids"] = np.full((b, length), pad_id, np.int32)
        batch[f"{side}_attention_mask"] = np.zeros((b, length), np.int32)
        batch[f"{side}_loss_mask"] = np.zeros((b, length), np.int32)
    for i, (index, prompt, chosen, rejected, record) in enumerate(rows):
        if index < 0:
            continue
        batch["index"][i] = index
        batch["weight"][i] = float(record.get("weight", 1.0))
        batch["smoothing"][i] = float(record.get("smoothing", 0.0))
        batch["p"][i] = float(record.get("p", 1.0))
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            n, m = len(prompt), len(response)
            batch[f"{side}_ids"][i, : n + m] = prompt + response
            batch[f"{side}_attention_mask"][i, : n + m] = 1
            batch[f"{side}_loss_mask"][i, n : n + m] = 1
    return batch


def build_pair_batches(
    records: Sequence[dict],
    tokenizer,
    *,
    batch_size: int,
    max_prompt_tokens: int,
    max_response_tokens: int,
    use_chat_template: bool = True,
    min_bucket: int = MIN_BUCKET,
) -> tuple[list[dict[str, np.ndarray]], PairReport]:
    """Tokenises ``records`` into pair batches of exactly ``batch_size`` rows.

    ``tokenizer`` needs ``encode_prompt(prompt, use_chat_template=...)`` and
    ``encode_response(text, add_eos=...)`` (``jaxalign.tokenizer.Tokenizer``).
    Each batch holds the pair-batch fields of ``jaxalign.training`` plus
    ``index [B] int32`` (the record's position in ``records``; -1 for a padding
    pair) and ``p [B] f32``. Batches are ordered by bucket, then record order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_prompt_tokens < 1 or max_response_tokens < 1:
        raise ValueError(
            f"max_prompt_tokens ({max_prompt_tokens}) and max_response_tokens "
            f"({max_response_tokens}) must be positive"
        )
    report = PairReport()
    pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    max_length = max_prompt_tokens + max_response_tokens
    by_bucket: dict[int, list] = collections.defaultdict(list)
    for index, record in enumerate(records):
        report.read += 1
        prompt, chosen, rejected, prompt_cut, cuts = _tokenise(
            record, tokenizer, max_prompt_tokens, max_response_tokens, use_chat_template
        )
        if not chosen or not rejected:
            report.skipped += 1
            report.reasons["empty_response"] += 1
            continue
        report.kept += 1
        report.truncated_prompts += int(prompt_cut)
        report.truncated_responses += cuts
        length = len(prompt) + max(len(chosen), len(rejected))
        bucket = bucket_length(length, max_length, min_bucket)
        by_bucket[bucket].append((index, prompt, chosen, rejected, record))
    batches = []
    for length in sorted(by_bucket):
        rows = by_bucket[length]
        report.buckets[length] = len(rows)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            missing = batch_size - len(chunk)
            report.padding_pairs += missing
            chunk = chunk + [(-1, [], [], [], {})] * missing
            batches.append(_pack(chunk, length, pad_id))
    return batches, report
