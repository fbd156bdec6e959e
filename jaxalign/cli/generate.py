"""``jaxalign generate``: sample responses for a JSONL prompt file.

    jaxalign generate --model smollm2-135m-instruct --prompts prompts.jsonl \\
        --out samples.jsonl --n 2 --temperature 0.7 --max-new-tokens 300

Input records are ``{"prompt": str | [{role, content}, ...], "id": optional}``; the
output has one line per prompt, ``{id, prompt, responses: [{text, finished,
truncated, num_tokens}]}``. Rerunning the same command after an interruption
skips the prompts already written.
"""

from __future__ import annotations

import argparse
import sys

from jaxalign.cli import flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxalign.models.llama import DTYPE_NAMES

    defaults = _defaults()
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="registered name, Hugging Face folder, .gguf file, or a run (RUN_DIR: its last "
        "round; RUN_DIR/round_K) (default: %(default)s)",
    )
    parser.add_argument("--prompts", required=True, help="input JSONL with a 'prompt' per line")
    parser.add_argument("--out", required=True, help="output JSONL (appended; resumable)")
    parser.add_argument(
        "--n", type=flags.positive_int, default=2, help="responses per prompt (SPA: 2)"
    )
    parser.add_argument("--temperature", type=flags.positive_number, default=defaults.temperature)
    parser.add_argument(
        "--top-p", type=flags.positive_fraction, default=defaults.top_p, help="1 disables top-p"
    )
    parser.add_argument(
        "--top-k", type=flags.non_negative_int, default=defaults.top_k, help="0 disables top-k"
    )
    parser.add_argument(
        "--min-p", type=flags.fraction, default=defaults.min_p, help="0 disables min-p"
    )
    parser.add_argument(
        "--max-new-tokens", type=flags.positive_int, default=defaults.max_new_tokens
    )
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--seed", type=flags.seed, default=0)
    parser.add_argument(
        "--batch-size", type=flags.positive_int, default=16, help="prompts per decode batch"
    )
    parser.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="compute dtype")
    parser.add_argument(
        "--on-bad-record",
        default="error",
        choices=("error", "skip"),
        help="stop at a malformed prompt record, or skip and count it",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _defaults():
    from jaxalign.sampling import SamplingConfig

    return SamplingConfig()


def main(args: argparse.Namespace) -> int:
    from jaxalign.data.records import DataError
    from jaxalign.generation import GenerationStats, generate_file
    from jaxalign.loading import load
    from jaxalign.sampling import SamplingConfig

    try:
        config = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            n=args.n,
            greedy=args.greedy,
        )
    except ValueError as e:
        print(f"jaxalign generate: {e}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load(args.model, dtype=args.dtype)
        stats = GenerationStats()
        summary = generate_file(
            model,
            tokenizer,
            args.prompts,
            args.out,
            config,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            stop_strings=tuple(args.stop),
            on_bad_record=args.on_bad_record,
            stats=stats,
        )
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"jaxalign generate: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: wrote {summary['written']} prompts, skipped {summary['skipped']} already "
        f"done ({summary['total']} in {args.prompts}); {stats.samples_per_second:.2f} samples/s, "
        f"{stats.tokens_per_second:.0f} tokens/s ({stats.tokens} kept of "
        f"{stats.decoded_tokens} decoded), {stats.compiles} compiles "
        f"({stats.compile_seconds:.1f} s)"
    )
    return 0
