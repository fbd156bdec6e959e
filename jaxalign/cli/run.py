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
        "--dry-run",
        action="store_true",
        help="check the config, the multi-process settings and the output directory's file "
        "system, print what would run, and run nothing (no device is touched)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.learning_rate=1e-6 spa.rounds=2",
    )


def describe_plan(config, settings: dict | None) -> list[str]:
    """What ``jaxalign run`` would do with ``config`` and the multi-process ``settings``
    (:func:`jaxalign.parallel.distributed_settings`), one line per fact."""
    m = config.run.mesh
    if settings is None:
        processes = "processes: 1 (no jax.distributed)"
    else:
        count = settings["num_processes"] or "detected by JAX"
        this = settings["process_id"]
        processes = (
            f"processes: {count}, this is process "
            f"{'detected by JAX' if this is None else this}, coordinator "
            f"{settings['coordinator_address'] or 'detected by JAX'}"
        )
    return [
        processes,
        f"algorithm: {config.run.algorithm}",
        f"model: {config.model.name}",
        f"output: {config.run.output_dir}",
        f"mesh: data={m.data} fsdp={m.fsdp} tensor={m.tensor}",
    ]


def main(args: argparse.Namespace) -> int:
    from jaxalign import parallel
    from jaxalign.algorithms.rounds import require_file_system
    from jaxalign.config import ConfigError, load_config

    try:
        if args.dry_run:
            settings = parallel.distributed_settings()
        else:
            parallel.initialize_distributed()  # several hosts: join them before JAX sees a device
    except (ValueError, RuntimeError) as e:
        print(f"jaxalign run: {e}", file=sys.stderr)
        return 2
    path = args.config or DEMO_CONFIG
    try:
        config = load_config(path, args.overrides)
        require_file_system(config.run.output_dir)
    except (ConfigError, ValueError) as e:
        print(f"jaxalign run: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"jaxalign run --dry-run: {path}, nothing run", flush=True)
        for line in describe_plan(config, settings):
            print(f"  {line}")
        return 0
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
