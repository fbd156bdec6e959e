"""``jaxalign export``: a run's model as a Hugging Face folder with a model card.

    jaxalign export runs/spa_demo --out smollm2-spa              # the last finished round
    jaxalign export runs/spa_demo --round 1 --out smollm2-spa-r1 --dtype bfloat16
    jaxalign export runs/ple_demo --out smollm2-ple              # adapters merged into the base
    jaxalign export runs/dpo --out smollm2-dpo                   # `jaxalign dpo`'s output

Any round that finished training can be exported, while the run goes on or after it
ended: SPA's ``round_K/model``, PLE's ``round_K/lora`` merged into the run's base model
(``W + s·A@B``), DPO's ``model/``. The run's ``config.yaml`` names the base model that
gives the structure and the tokenizer. The folder holds ``config.json``,
``model.safetensors`` (in ``--dtype``), the tokenizer with its chat template,
``generation_config.json`` and ``README.md``, a model card with the run's config, data
counts and summary table. It loads with ``transformers.AutoModelForCausalLM``, serves
with vLLM, and converts to GGUF with llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jaxalign.cli import flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run directory (or RUN_DIR/round_K, or a round's model/ or lora/ folder)",
    )
    parser.add_argument(
        "--round",
        type=flags.non_negative_int,
        default=None,
        help="which round (PLE: iteration) to export (default: the last that finished training)",
    )
    parser.add_argument("--out", required=True, help="the folder to write (new, or an export)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the exported tensors (default: %(default)s)",
    )


def summary_table(run_dir: pathlib.Path) -> str | None:
    """The table of a run's ``summary.md`` (its ``# title`` line left out), if it has one."""
    path = run_dir / "summary.md"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    table = "\n".join(line for line in lines if not line.startswith("# ")).strip()
    return table or None


def _check_out(out: pathlib.Path, run_dir: pathlib.Path) -> None:
    """Refuses an ``--out`` whose contents the export would replace, unless it is an export."""
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        if out.name != "model_hf":
            raise ValueError(
                f"--out {out} is inside the run directory {run_dir}; choose a folder outside "
                "it (or RUN_DIR/round_K/model_hf, where the run itself exports)"
            )
    if out.is_file():
        raise ValueError(f"--out {out} is a file; name a folder to create")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(
            f"--out {out} exists and is not an exported model (no config.json); the export "
            "replaces the folder whole, so name a new folder or remove this one"
        )


def export_run(run_dir: str, round_index: int | None, out: str, dtype: str) -> dict:
    """Everything ``main`` does; returns what was exported."""
    from jaxalign import loading
    from jaxalign.algorithms import stages

    source = pathlib.Path(run_dir)
    root = loading.run_directory(source)
    if round_index is not None and root is not None:
        source = root / f"round_{round_index}"
    run = loading.find_run_model(source) if root is not None else None
    if run is None:
        raise ValueError(
            f"{source}: not a jaxalign run: a run directory holds {loading.RUN_CONFIG} (and "
            f"{loading.RUN_STATE}), as `jaxalign run` and `jaxalign dpo` write them"
        )
    target = pathlib.Path(out)
    _check_out(target, run.run_dir)
    model, tokenizer = loading.load_run_model(run)
    if run.algorithm == "dpo":
        summary = run.run_dir / "summary.json"
        results = json.loads(summary.read_text()) if summary.is_file() else {}
        name = run.run_dir.name
    else:
        results = loading.read_run_stages(run.run_dir)
        name = f"{run.run_dir.name} round {run.round_index}"
    facts = stages.card_facts(
        run.config,
        results,
        run.round_index,
        name=name,
        summary_table=summary_table(run.run_dir),
        dtype=dtype,
    )
    stages.write_hf_folder(target, model, tokenizer, facts, dtype=dtype)
    return {
        "source": str(run.params_dir),
        "round": run.round_index,
        "algorithm": run.algorithm,
        "base": run.base,
        "out": str(target),
        "files": sorted(p.name for p in target.iterdir()),
    }


def main(args: argparse.Namespace) -> int:
    try:
        done = export_run(args.run_dir, args.round, args.out, args.dtype)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"jaxalign export: {e}", file=sys.stderr)
        return 1
    which = "" if done["round"] is None else f"round {done['round']} "
    print(
        f"{done['out']}: {done['algorithm']} {which}from {done['source']} on {done['base']} "
        f"({args.dtype}); files: {', '.join(done['files'])}"
    )
    return 0
