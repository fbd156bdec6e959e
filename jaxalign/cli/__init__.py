"""The ``jaxalign`` command line: ``jaxalign <command> [options]``.

Each command lives in its own module of this package with ``add_arguments(parser)``
and ``main(args) -> int``; modules are imported only when their command runs, so
``jaxalign --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "run": ("jaxalign.cli.run", "run an alignment job from a config (default: the SPA demo)"),
    "dpo": ("jaxalign.cli.dpo", "DPO on a preference file"),
    "generate": ("jaxalign.cli.generate", "sample responses for a prompt file"),
    "data": ("jaxalign.cli.data", "inspect and convert datasets"),
    "eval": ("jaxalign.cli.eval", "win rate, lengths and KL of a model against a baseline"),
    "report": ("jaxalign.cli.report", "HTML/Markdown report with plots of a run directory"),
    "export": (
        "jaxalign.cli.export",
        "a run's model as a Hugging Face folder with a model card",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxalign",
        description="Align language models with self-generated preference data (SPA, PLE).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def configure_logging() -> None:
    """What a command prints besides its own lines: jaxalign's INFO messages (a model
    converted once, ...) and every library's warnings and errors, without JAX's
    backend-probe messages (:func:`jaxalign.parallel.quiet_backend_probes`)."""
    from jaxalign import parallel

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("jaxalign").setLevel(logging.INFO)
    parallel.quiet_backend_probes()


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (2: a bad flag, config or usage)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["run"]  # the default job: the SPA demo on the embedded model
    if argv[0] in COMMANDS:
        sub_parser = argparse.ArgumentParser(
            prog=f"jaxalign {argv[0]}", description=COMMANDS[argv[0]][1]
        )
        module = importlib.import_module(COMMANDS[argv[0]][0])
        module.add_arguments(sub_parser)
        try:
            args = sub_parser.parse_args(argv[1:])
        except SystemExit as e:  # a usage error (2) or --help (0), already printed
            return int(e.code or 0)
        configure_logging()
        if argv[0] != "run":  # a run's config decides (run.compile_cache)
            from jaxalign import parallel
            from jaxalign.loading import compile_cache_dir

            parallel.use_compile_cache(compile_cache_dir())
        return int(module.main(args) or 0)
    parser.parse_args(argv)  # prints help or a usage error
    return 2


if __name__ == "__main__":
    sys.exit(main())
