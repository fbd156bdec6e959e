"""Wall-clock split of one SPA demo round: sample / judge / train / checkpoint / eval.

    python benchmarks/spa_round.py [--prompts 48] [key=value ...]

Runs round 0 (seed DPO) and one self-annotated round of the demo config in a fresh
run directory, then reads each stage's time from the run's ``state.json``. Prints
one JSON line: seconds per stage of round 1, each stage's share, and the slowest.
Compile time is included in each stage's first use (the sampler, the judge's
forward pass and the train step compile once per shape bucket).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

from jaxalign.algorithms import spa
from jaxalign.cli.run import DEMO_CONFIG
from jaxalign.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = pathlib.Path(tempfile.mkdtemp(prefix="spa_round_")) / "run"
    config = load_config(
        DEMO_CONFIG,
        [
            "spa.rounds=1",
            f"spa.prompts_per_round=[{args.prompts}]",
            "run.progress=false",
            f"run.output_dir={out}",
            *args.overrides,
        ],
    )
    start = time.perf_counter()
    spa.run(config, log=lambda m: print(m, file=sys.stderr))
    total = time.perf_counter() - start
    stages = json.loads((out / "state.json").read_text())["stages"]
    train = stages["round_1/train"]
    ckpt = train["result"]["checkpoint_seconds"]
    split = {
        "sample": stages["round_1/sample"]["seconds"],
        "judge": stages["round_1/judge"]["seconds"],
        "train": train["seconds"] - ckpt,
        "checkpoint": ckpt,
        "eval": stages.get("round_1/eval", {}).get("seconds", 0.0),
    }
    round_total = sum(split.values())
    print(
        json.dumps(
            {
                "benchmark": "spa_round",
                "prompts": args.prompts,
                "pairs": stages["round_1/judge"]["result"]["count/kept"],
                "round_1_seconds": split,
                "round_1_share": {k: round(v / round_total, 3) for k, v in split.items()},
                "slowest_stage": max(split, key=split.get),
                "round_0_train_seconds": stages["round_0/train"]["seconds"],
                "total_seconds": round(total, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
