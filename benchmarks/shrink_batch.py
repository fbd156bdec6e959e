"""Sampling a round's prompts with and without the shrinking batch (``sampling.shrink_batch``).

A round's sampler decodes a batch until its longest row ends; the rows that ended before it
are padding from then on. With ``shrink_batch`` the loop halves its rows whenever at most
half still run. This script samples the same prompts both ways with
SmolLM2-135M-Instruct — a round's shape by default: 16 prompts × 2 samples (32 rows), up to
64 new tokens, temperature 0.7, the tokenizer's EOS — checks that the responses are the
same, and prints one JSON line: seconds per pass (each program compiled before the timed
passes, the passes interleaved), rows × steps decoded, tokens kept, and the ratio.

    python benchmarks/shrink_batch.py [--prompts demo|instructions] [--batch 16] [--n 2]
        [--new-tokens 64] [--count 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from machine import cpu_description

from jaxalign import generation
from jaxalign.algorithms.rounds import read_jsonl
from jaxalign.generation import GenerationStats, sample_texts
from jaxalign.loading import default_cache_dir, load
from jaxalign.sampling import SamplingConfig

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_FILES = {
    "demo": os.path.join(HERE, "..", "jaxalign", "data", "demo", "prompts.jsonl"),
    "instructions": os.path.join(HERE, "..", "jaxalign", "data", "instructions", "train.jsonl"),
}


def sample(model, tokenizer, prompts, config, batch: int):
    """``(responses' token ids, stats)`` of one pass over ``prompts``."""
    stats = GenerationStats()
    out = sample_texts(
        model, tokenizer, prompts, config, seed=0, batch_size=batch, progress=False, stats=stats
    )
    return [[c.token_ids for c in group] for group in out], stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", choices=sorted(PROMPT_FILES), default="demo")
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--count", type=int, default=64, help="prompts sampled per pass")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")

    model, tokenizer = load("smollm2-135m-instruct", cache_dir=default_cache_dir())
    rows = list(read_jsonl(PROMPT_FILES[args.prompts]))[: args.count]
    prompts = [r["prompt"] for r in rows]
    base = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.7, n=args.n)
    configs = {
        "whole": base.replace(shrink_batch=False),
        "shrink": base.replace(shrink_batch=True),
    }
    compile_s = {}
    for name, config in configs.items():  # compile both programs (one bucket each) first
        start = time.perf_counter()
        sample(model, tokenizer, prompts[: args.batch], config, args.batch)
        compile_s[name] = round(time.perf_counter() - start, 1)
    seconds = {name: [] for name in configs}
    results = {}
    for _ in range(args.repeats):
        for name, config in configs.items():
            tokens, stats = sample(model, tokenizer, prompts, config, args.batch)
            seconds[name].append(stats.seconds - stats.compile_seconds)
            results[name] = (tokens, stats)
    same = results["whole"][0] == results["shrink"][0]
    stats = {name: s for name, (_, s) in results.items()}
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(
        json.dumps(
            {
                "prompts": args.prompts,
                "count": len(prompts),
                "rows_per_batch": args.batch * args.n,
                "new_tokens": args.new_tokens,
                "whole_s": round(median["whole"], 2),
                "shrink_s": round(median["shrink"], 2),
                "ratio": round(median["whole"] / median["shrink"], 3),
                "whole_row_steps": stats["whole"].decoded_tokens,
                "shrink_row_steps": stats["shrink"].decoded_tokens,
                "kept_tokens": stats["shrink"].tokens,
                "first_pass_s_with_compile": compile_s,
                "same_samples": same,
                "cpu": cpu_description(),
            }
        )
    )
    if not same:
        raise SystemExit("the shrinking batch changed the samples")


if __name__ == "__main__":
    generation.logger.setLevel("WARNING")
    main()
