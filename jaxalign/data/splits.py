"""SPA's data splits: a few labelled seed pairs, then disjoint prompt sets per round.

SPA (Kim et al., arXiv 2406.04412) starts from 3.3% of UltraFeedback's labelled pairs (2K of
60K) as seed data and uses the remaining prompts, without their labels, as the prompts of
its rounds (8K, 20K, 30K). ``split_seed_and_rounds`` reproduces that from a seed:

1. pairs are deduplicated by normalised prompt text (first occurrence kept; the others
   counted as ``duplicates``), so no prompt can reach two sets;
2. a seeded permutation orders the unique pairs; the first
   ``round(seed_fraction * unique)`` are the seed pairs;
3. the following prompts fill the rounds in order, with the sizes asked for; what is
   left over is counted as ``unused``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from jaxalign.data.records import DataError, write_jsonl

SPA_SEED_FRACTION = 0.033  # paper: 2K of UltraFeedback's ~60K pairs
SPA_ROUND_SIZES = (8000, 20000, 30000)  # paper: prompts of rounds 1-3
_RESPONSE_FIELDS = ("chosen", "rejected", "score_chosen", "score_rejected", "messages")


def normalise_prompt(prompt: str | list[dict]) -> str:
    """The dedup key of a prompt: NFKC text of its messages, case-folded, spaces collapsed."""
    if isinstance(prompt, list):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    text = unicodedata.normalize("NFKC", prompt).casefold()
    return re.sub(r"\s+", " ", text).strip()


def prompt_record(pair: dict) -> dict:
    """A pair without its responses and their scores: ``{id, prompt, ...}``."""
    return {k: v for k, v in pair.items() if k not in _RESPONSE_FIELDS}


@dataclasses.dataclass
class SeedSplit:
    """``seed_pairs``; ``rounds[r]`` = prompt records of round ``r + 1``; counts."""

    seed_pairs: list[dict]
    rounds: list[list[dict]]
    duplicates: int
    unused: int

    def counts(self) -> dict:
        return {
            "seed_pairs": len(self.seed_pairs),
            "rounds": [len(r) for r in self.rounds],
            "duplicates": self.duplicates,
            "unused": self.unused,
        }


def split_seed_and_rounds(
    pairs: Sequence[dict],
    seed_fraction: float = SPA_SEED_FRACTION,
    round_sizes: Sequence[int] = SPA_ROUND_SIZES,
    seed: int = 0,
) -> SeedSplit:
    """Seeded, disjoint split of canonical pairs into seed pairs and per-round prompts."""
    if not 0.0 < seed_fraction < 1.0:
        raise DataError(f"seed_fraction must be in (0, 1), got {seed_fraction}")
    if any(int(s) < 1 for s in round_sizes):
        raise DataError(f"round sizes must be positive, got {list(round_sizes)}")
    unique, seen = [], set()
    for pair in pairs:
        key = normalise_prompt(pair["prompt"])
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    duplicates = len(pairs) - len(unique)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_seed = round(seed_fraction * len(unique))
    if n_seed < 1:
        raise DataError(
            f"seed_fraction {seed_fraction} of {len(unique)} unique prompts is no seed pair"
        )
    available = len(unique) - n_seed
    if sum(round_sizes) > available:
        raise DataError(
            f"rounds of {list(round_sizes)} (total {sum(round_sizes)}) prompts need more than "
            f"the {available} unique prompts left after {n_seed} seed pairs "
            f"({duplicates} duplicate prompts dropped); ask for smaller rounds"
        )
    shuffled = [unique[i] for i in order]
    rounds, start = [], n_seed
    for size in round_sizes:
        rounds.append([prompt_record(p) for p in shuffled[start : start + int(size)]])
        start += int(size)
    return SeedSplit(shuffled[:n_seed], rounds, duplicates, len(unique) - start)


def write_split(split: SeedSplit, out_dir: str | pathlib.Path, source: dict) -> dict:
    """Writes ``seed_pairs.jsonl``, ``round_<r>_prompts.jsonl`` and ``split.json`` (counts +
    ``source``, e.g. file, seed and fraction); returns the ``split.json`` content."""
    out = pathlib.Path(out_dir)
    files = {"seed_pairs": str(write_jsonl(out / "seed_pairs.jsonl", split.seed_pairs))}
    for r, prompts in enumerate(split.rounds, 1):
        files[f"round_{r}"] = str(write_jsonl(out / f"round_{r}_prompts.jsonl", prompts))
    summary = {"source": source, "counts": split.counts(), "files": files}
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
