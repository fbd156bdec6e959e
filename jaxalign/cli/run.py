"""``jaxalign run``: an alignment job from a YAML config (default: the SPA demo)."""

from __future__ import annotations

import argparse
import pathlib
import sys

DEMO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo_smollm2.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config (default: the embedded SPA demo on SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.learning_rate=1e-6 spa.rounds=2",
    )


def main(args: argparse.Namespace) -> int:
    from jaxalign import parallel
    from jaxalign.config import ConfigError, load_config

    parallel.initialize_distributed()  # several hosts: join them before JAX sees any device
    path = args.config or DEMO_CONFIG
    try:
        config = load_config(path, args.overrides)
    except ConfigError as e:
        print(f"jaxalign run: {e}", file=sys.stderr)
        return 2
    if config.run.algorithm == "spa":
        from jaxalign.algorithms import spa

        spa.run(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        return 0
    if config.run.algorithm == "ple":
        from jaxalign.algorithms import ple

        ple.run(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        return 0
    print(
        f"jaxalign run: run.algorithm={config.run.algorithm!r} is not available; choose spa or ple",
        file=sys.stderr,
    )
    return 2
