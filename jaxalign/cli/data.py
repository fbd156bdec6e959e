"""``jaxalign data``: inspect, split and convert datasets.

    jaxalign data inspect pairs.jsonl [--layout hh] [--model smollm2-135m-instruct]
    jaxalign data split --pairs uf.parquet --layout ultrafeedback --seed-fraction 0.033 \\
        --rounds 8000,20000,30000 --out splits/
    jaxalign data build --train uf.parquet [--split test=uf_test.parquet] \\
        --layout ultrafeedback --out ~/tfds

``inspect`` reads with bad records skipped and counted, then prints the counts, token
length histograms, truncation counts and rendered chat-templated examples. ``split``
writes SPA's seed pairs and disjoint per-round prompt sets. ``build`` materialises the
files as TFDS array_record splits (no TensorFlow needed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jaxalign.cli import flags
from jaxalign.data.layouts import LAYOUTS

_DEFAULT_MODEL = "smollm2-135m-instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    layouts = ", ".join(LAYOUTS)

    inspect = actions.add_parser("inspect", help="counts, token lengths and examples of a file")
    inspect.add_argument("file", help="JSONL or Parquet file ('demo': the demo seed pairs)")
    inspect.add_argument("--layout", default="auto", help=f"record layout: auto (guess), {layouts}")
    inspect.add_argument(
        "--model",
        default=_DEFAULT_MODEL,
        help="tokenizer: registered model name, Hugging Face folder, .gguf file, or 'none' "
        "(no token statistics) (default: %(default)s)",
    )
    inspect.add_argument("--max-prompt-tokens", type=flags.positive_int, default=512)
    inspect.add_argument("--max-response-tokens", type=flags.positive_int, default=512)
    inspect.add_argument(
        "--max-chars", type=flags.positive_int, default=None, help="skip longer texts"
    )
    inspect.add_argument("--bins", type=flags.positive_int, default=10, help="histogram bins")
    inspect.add_argument(
        "--examples", type=flags.non_negative_int, default=2, help="rendered examples to show"
    )
    inspect.add_argument(
        "--limit",
        type=flags.positive_int,
        default=None,
        help="tokenise only the first N kept records",
    )

    split = actions.add_parser("split", help="SPA seed pairs + disjoint per-round prompt sets")
    split.add_argument("--pairs", required=True, help="preference file ('demo': demo pairs)")
    split.add_argument("--layout", default="pairs", help=f"record layout: {layouts}")
    split.add_argument(
        "--seed-fraction", type=flags.open_fraction, default=0.033, help="paper: 0.033"
    )
    split.add_argument(
        "--rounds",
        type=flags.positive_int_list,
        default=(8000, 20000, 30000),
        help="prompts per round, comma-separated (paper: 8000,20000,30000)",
    )
    split.add_argument("--seed", type=flags.seed, default=0)
    split.add_argument("--out", required=True, help="output folder")
    split.add_argument("--on-bad-record", default="error", choices=("error", "skip"))

    build = actions.add_parser("build", help="materialise files as TFDS array_record splits")
    build.add_argument("--train", required=True, help="train file ('demo': the demo data)")
    build.add_argument(
        "--split", action="append", default=[], metavar="NAME=FILE", help="another split"
    )
    build.add_argument("--layout", default="pairs", help=f"record layout: {layouts}")
    build.add_argument("--name", default="local", help="dataset name (letters, digits, _)")
    build.add_argument("--out", required=True, help="TFDS data_dir")
    build.add_argument(
        "--max-chars", type=flags.positive_int, default=None, help="skip longer texts"
    )
    build.add_argument("--on-bad-record", default="error", choices=("error", "skip"))


def load_tokenizer(name: str):
    """A ``Tokenizer`` from a registered name (its GGUF), a ``.gguf`` file or a HF folder."""
    from jaxalign.loading import EMBEDDED, installed_gguf
    from jaxalign.tokenizer import Tokenizer

    if name in EMBEDDED:
        path = installed_gguf(EMBEDDED[name])
        if path is None:
            raise ValueError(
                f"{name} is not installed; `{EMBEDDED[name].install_command}`, or pass "
                "--model FOLDER|FILE.gguf, or --model none"
            )
        return Tokenizer.from_gguf(path)
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        return Tokenizer.from_gguf(path)
    if path.is_dir():
        return Tokenizer.from_pretrained(path)
    raise ValueError(
        f"--model {name!r}: not a registered name ({', '.join(EMBEDDED)}), file or folder"
    )


def _first_layout(path: pathlib.Path) -> str:
    """The layout guessed from the first readable record (``pairs`` when none is)."""
    from jaxalign.data.layouts import detect_layout
    from jaxalign.data.records import RecordError, raw_records

    for _, _, raw in raw_records(path):
        if not isinstance(raw, RecordError):
            return detect_layout(raw)
    return "pairs"


def inspect(args: argparse.Namespace, out=sys.stdout) -> int:
    from jaxalign.data import stats
    from jaxalign.data.records import read_records, resolve_path

    path = resolve_path(args.file, "pairs")
    layout = _first_layout(path) if args.layout == "auto" else args.layout
    records, report = read_records(path, layout, on_bad_record="skip", max_chars=args.max_chars)
    print(f"layout: {layout}", file=out)
    print(report.summary(), file=out)
    if args.model == "none" or not records:
        return 0
    tokenizer = load_tokenizer(args.model)
    sample = records[: args.limit] if args.limit else records
    lengths = stats.token_lengths(sample, tokenizer)
    print(f"\ntoken lengths of {len(sample)} records ({args.model}):", file=out)
    for name in ("prompt", "chosen", "rejected"):
        values = getattr(lengths, name)
        if values:
            print(stats.format_histogram(name, values, args.bins), file=out)
    cut = stats.truncation_counts(lengths, args.max_prompt_tokens, args.max_response_tokens)
    print(
        f"\ntruncated at --max-prompt-tokens {args.max_prompt_tokens} / --max-response-tokens "
        f"{args.max_response_tokens}: "
        + ", ".join(f"{k} {v}" for k, v in cut.items() if getattr(lengths, k)),
        file=out,
    )
    for record in records[: args.examples]:
        print(f"\n--- example {record['id']} ---", file=out)
        if "chosen" in record:
            for side in ("chosen", "rejected"):
                print(f"[{side}]\n{stats.render_example(record, tokenizer, side)}", file=out)
        else:
            messages = stats.prompt_messages(record["prompt"])
            print(tokenizer.apply_chat_template(messages, add_generation_prompt=True), file=out)
    return 0


def split(args: argparse.Namespace, out=sys.stdout) -> int:
    from jaxalign.data.records import read_preference_records
    from jaxalign.data.splits import split_seed_and_rounds, write_split

    sizes = list(args.rounds)
    pairs, report = read_preference_records(args.pairs, args.on_bad_record, layout=args.layout)
    print(report.summary(), file=out)
    result = split_seed_and_rounds(pairs, args.seed_fraction, sizes, args.seed)
    source = {
        "pairs": report.path,
        "layout": args.layout,
        "seed_fraction": args.seed_fraction,
        "rounds": sizes,
        "seed": args.seed,
        "read": report.to_dict(),
    }
    summary = write_split(result, args.out, source)
    print(json.dumps(summary["counts"]), file=out)
    print(f"written to {args.out}", file=out)
    return 0


def build(args: argparse.Namespace, out=sys.stdout) -> int:
    from jaxalign.data.builders import build_dataset, load_split, quiet_tfds

    quiet_tfds()
    files = {"train": args.train}
    for item in args.split:
        name, sep, file = item.partition("=")
        if not sep:
            raise ValueError(f"--split takes NAME=FILE, got {item!r}")
        files[name] = file
    result = build_dataset(
        files, args.layout, args.out, args.name, args.on_bad_record, args.max_chars
    )
    for name in files:
        print(result.reports[name].summary() if name in result.reports else name, file=out)
        print(f"  {name}: {len(load_split(result.builder, name))} records", file=out)
    print(f"prepared in {result.data_dir}", file=out)
    return 0


def main(args: argparse.Namespace) -> int:
    from jaxalign.data.records import DataError

    action = {"inspect": inspect, "split": split, "build": build}[args.action]
    try:
        return action(args)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"jaxalign data {args.action}: {e}", file=sys.stderr)
        return 2
