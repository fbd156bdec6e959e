"""Text preference records → tokenised, bucketed pair batches (layout: ``jaxalign.training``).

Each record ``{prompt, chosen, rejected}`` becomes two rows, prompt + response,
right-padded from column 0. Prompts longer than ``max_prompt_tokens`` lose
their *beginning* (the end of a prompt is what the response answers);
responses longer than ``max_response_tokens`` lose their end (and so their
EOS). Both truncations are counted. Rows are grouped into length buckets
(``jaxalign.data.buckets``, so a run compiles a handful of shapes), and the last batch of
a bucket is filled with weight-0 padding pairs.

On several hosts each tokenises only its own records (:func:`bucket_pairs`) and the hosts
agree on one batch plan from their per-bucket counts (:func:`plan_pair_batches`): bucket
``T`` gets ``ceil(max over hosts of count / rows)`` batches, ``rows`` being the rows a host
feeds per global batch, and neighbouring buckets are packed together at the longer length
where that computes fewer padded positions. Each host fills its rows of those batches
with its own records and weight-0 padding (:func:`pack_pair_batches`), so batch ``k`` has
the same shape on every host. On one host this is exactly :func:`build_pair_batches`.

Optional record fields: ``weight`` (default 1), ``smoothing`` (default 0),
``p`` (the judge's preference probability, default 1), ``chosen_eos`` /
``rejected_eos`` (False for a response that was cut at a sampling limit, so
no EOS is appended), and ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``: the exact
token ids a sampler was given and produced (self-generated pairs carry them), used
instead of encoding the text again, so a response is judged and trained token for
token as it was sampled.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

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

    def to_dict(self) -> dict:
        return {
            **{k: getattr(self, k) for k in _PAIR_COUNTS},
            "reasons": dict(self.reasons),
            "buckets": {str(t): n for t, n in self.buckets.items()},  # JSON keys are strings
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> PairReport:
        return cls(
            **{k: d[k] for k in _PAIR_COUNTS},
            reasons=collections.Counter(d["reasons"]),
            buckets={int(t): n for t, n in d["buckets"].items()},
        )

    @classmethod
    def combine(cls, reports: Sequence[PairReport]) -> PairReport:
        """The report of several hosts' shares together: every count summed, bucket by bucket."""
        total = cls()
        for r in reports:
            for k in _PAIR_COUNTS:
                setattr(total, k, getattr(total, k) + getattr(r, k))
            total.reasons.update(r.reasons)
            for t, n in r.buckets.items():
                total.buckets[t] = total.buckets.get(t, 0) + n
        total.buckets = dict(sorted(total.buckets.items()))
        return total


_PAIR_COUNTS = (
    "read",
    "kept",
    "skipped",
    "truncated_prompts",
    "truncated_responses",
    "padding_pairs",
)
PairRow = tuple[
    int, list[int], list[int], list[int], dict
]  # (index, prompt, chosen, rejected, record)


def response_ids(record: Mapping, side: str, tokenizer) -> list[int]:
    """The token ids of a record's ``side`` (``chosen``/``rejected``) response.

    With ``<side>_ids`` (the exact ids a sampler produced, its EOS token included when it
    made one) those ids; else the text encoded. Either way a finished response
    (``<side>_eos``, default true) ends with an end-of-turn token and a cut one has none.
    """
    finished = bool(record.get(f"{side}_eos", True))
    if f"{side}_ids" not in record:
        return tokenizer.encode_response(record[side], add_eos=finished)
    ids = [int(t) for t in record[f"{side}_ids"]]
    ends = set(tokenizer.eos_token_ids)
    if finished and not (ids and ids[-1] in ends):  # stopped by a stop string
        ids.append(tokenizer.end_of_turn_id)
    if not finished and ids and ids[-1] in ends:
        ids = ids[:-1]
    return ids


def _tokenise(record, tokenizer, max_prompt_tokens, max_response_tokens, use_chat_template):
    """``(prompt_ids, chosen_ids, rejected_ids, prompt_cut, responses_cut)`` of one record.

    ``prompt_ids`` in the record (the ids a sampler was given) are used as they are;
    otherwise the prompt is encoded with ``use_chat_template``."""
    if "prompt_ids" in record:
        prompt = [int(t) for t in record["prompt_ids"]]
    else:
        prompt = tokenizer.encode_prompt(record["prompt"], use_chat_template=use_chat_template)
    prompt_cut = len(prompt) > max_prompt_tokens
    prompt = prompt[len(prompt) - max_prompt_tokens :] if prompt_cut else prompt
    responses, cuts = [], 0
    for side in ("chosen", "rejected"):
        ids = response_ids(record, side, tokenizer)
        if len(ids) > max_response_tokens:
            ids, cuts = ids[:max_response_tokens], cuts + 1
        responses.append(ids)
    return prompt, responses[0], responses[1], prompt_cut, cuts


def _pack(rows: list[PairRow], length: int, pad_id: int):
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


def pad_token_id(tokenizer) -> int:
    """The id that fills padded positions (0 when the tokenizer has none)."""
    return int(getattr(tokenizer, "pad_token_id", 0) or 0)


def bucket_pairs(
    records: Sequence[dict],
    tokenizer,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    use_chat_template: bool = True,
    min_bucket: int = MIN_BUCKET,
    indices: Sequence[int] | None = None,
) -> tuple[dict[int, list[PairRow]], PairReport]:
    """Tokenises ``records`` and groups them by length bucket, in record order.

    Returns ``{bucket length: rows}`` and the report (``buckets``: pairs per bucket).
    ``indices``: each record's global index, the batches' ``index`` field (default:
    its position in ``records``).
    """
    if max_prompt_tokens < 1 or max_response_tokens < 1:
        raise ValueError(
            f"max_prompt_tokens ({max_prompt_tokens}) and max_response_tokens "
            f"({max_response_tokens}) must be positive"
        )
    if indices is not None and len(indices) != len(records):
        raise ValueError(f"{len(indices)} indices for {len(records)} records")
    indices = range(len(records)) if indices is None else indices
    report = PairReport()
    max_length = max_prompt_tokens + max_response_tokens
    by_bucket: dict[int, list[PairRow]] = collections.defaultdict(list)
    for index, record in zip(indices, records, strict=True):
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
        by_bucket[bucket].append((int(index), prompt, chosen, rejected, record))
    by_bucket = dict(sorted(by_bucket.items()))
    report.buckets = {length: len(rows) for length, rows in by_bucket.items()}
    return by_bucket, report


def plan_pair_batches(
    bucket_counts: Sequence[Mapping[int, int]], rows: int, merge: bool = True
) -> list[int]:
    """The padded length of every batch that all hosts run together, in order.

    ``bucket_counts[h]``: host ``h``'s pairs per bucket length; ``rows``: the rows each
    host feeds per global batch. A group of buckets packed at its longest length ``T``
    (ascending) gets ``ceil(max_h count / rows)`` batches, so every host's pairs fit and
    the hosts run the same number of batches of the same shapes. With one host and
    ``rows`` = the batch size this is the bucketing of :func:`build_pair_batches`.

    With ``merge`` (default), neighbouring buckets are packed together at the longer one's
    length while that lowers the padded positions the plan computes (``Σ batches · T``):
    a bucket whose last batch would be mostly weight-0 padding joins the next, so a small
    round runs fewer, fuller batches and compiles fewer shapes. Each step merges the pair
    of neighbours that saves most, until no merge saves any.
    """
    if rows < 1:
        raise ValueError(f"rows per host must be positive, got {rows}")
    lengths = sorted({int(t) for counts in bucket_counts for t, n in counts.items() if n > 0})

    def batches(group: list[int]) -> int:
        most = max(sum(int(counts.get(t, 0)) for t in group) for counts in bucket_counts)
        return math.ceil(most / rows)

    groups = [[length] for length in lengths]
    while merge and len(groups) > 1:
        savings = [
            batches(a) * a[-1] + batches(b) * b[-1] - batches(a + b) * b[-1]
            for a, b in itertools.pairwise(groups)
        ]
        best = max(range(len(savings)), key=savings.__getitem__)
        if savings[best] <= 0:
            break
        groups[best : best + 2] = [groups[best] + groups[best + 1]]
    return [group[-1] for group in groups for _ in range(batches(group))]


def pack_pair_batches(
    by_bucket: Mapping[int, Sequence[PairRow]], plan: Sequence[int], rows: int, pad_id: int
) -> list[dict[str, np.ndarray]]:
    """This host's ``rows``-row part of every batch of ``plan``, weight-0 pairs filling the rest.

    ``by_bucket`` from :func:`bucket_pairs`; ``plan`` from :func:`plan_pair_batches`. Each
    bucket's pairs go to the shortest planned length that holds them; the pairs of one
    planned length keep record order (``index``).
    """
    groups = [(length, len(list(group))) for length, group in itertools.groupby(plan)]
    planned = dict(groups)
    if len(groups) != len(planned):  # a length in two runs: one bucket's batches split
        raise ValueError("the plan must list each bucket's batches together")
    packed: dict[int, list[PairRow]] = {length: [] for length in planned}
    ascending = sorted(planned)
    for length, pairs in sorted(by_bucket.items()):
        if not pairs:
            continue
        target = next((t for t in ascending if t >= length), None)
        if target is None:
            raise ValueError(
                f"bucket {length} holds {len(pairs)} pairs but the plan has no batch that "
                f"long (longest {max(planned, default=0)}); build the plan from every host's "
                "counts"
            )
        packed[target] += pairs
    for length, pairs in packed.items():
        if len(pairs) > planned[length] * rows:
            raise ValueError(
                f"{len(pairs)} pairs are packed at length {length} but the plan has room for "
                f"{planned[length] * rows}; build the plan from every host's counts"
            )
    batches = []
    for length, count in planned.items():
        pairs = sorted(packed[length], key=lambda row: row[0])
        for start in range(0, count * rows, rows):
            chunk = pairs[start : start + rows]
            chunk = chunk + [(-1, [], [], [], {})] * (rows - len(chunk))
            batches.append(_pack(chunk, length, pad_id))
    return batches


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
    by_bucket, report = bucket_pairs(
        records,
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        use_chat_template=use_chat_template,
        min_bucket=min_bucket,
    )
    plan = plan_pair_batches([report.buckets], batch_size)
    batches = pack_pair_batches(by_bucket, plan, batch_size, pad_token_id(tokenizer))
    report.padding_pairs = len(plan) * batch_size - report.kept
    return batches, report


def pair_batches(records: Sequence[dict], tokenizer, config) -> tuple[list[dict], PairReport]:
    """:func:`build_pair_batches` with a run's sizes: ``config.train.batch_size`` pairs per
    batch, ``config.data``'s token limits and chat-template setting (``config``: a
    :class:`jaxalign.config.Config`).

    Records may carry ``chosen_eos``/``rejected_eos`` (False for a response cut
    at the token limit, so no EOS is appended) and ``p`` (the judge's
    preference probability, kept as a batch field for SPA's label modes).
    """
    return build_pair_batches(
        records,
        tokenizer,
        batch_size=config.train.batch_size,
        max_prompt_tokens=config.data.max_prompt_tokens,
        max_response_tokens=config.data.max_response_tokens,
        use_chat_template=config.data.use_chat_template,
    )
