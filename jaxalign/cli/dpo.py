"""``jaxalign dpo``: DPO on a JSONL preference file, resumable.

    jaxalign dpo --config my.yaml data.seed_pairs=pairs.jsonl train.epochs=1

Reads ``{prompt, chosen, rejected}`` records (``data.seed_pairs``), tokenises
and buckets them, precomputes the reference model's log-probs once (stored in
the output directory), then trains for ``train.epochs`` with a progress bar.
Metrics go to ``<output_dir>/metrics.jsonl`` (and TensorBoard when
``tensorboardX`` is installed); the train state is checkpointed every
``--save-every`` steps. Rerunning the same command resumes from the latest
checkpoint; the batch order of every epoch is a function of the seed, so a
resumed run sees the same batches as an uninterrupted one. The final
parameters are written to ``<output_dir>/model`` (``checkpoint.load_params``; with
``dpo.lora_rank`` r > 0, LoRA adapters train on the frozen model and go to
``<output_dir>/lora``), and
the model as a Hugging Face folder with a model card to ``<output_dir>/model_hf``
(unless ``run.export_hf=none``); ``<output_dir>/config.yaml`` records the run, so
``jaxalign eval --model <output_dir>`` takes the trained model.

With several processes (``jax.distributed``) each host reads and tokenises only its
share of the pair file (``algorithms.dpo.read_host_pairs``/``host_pair_batches``) and
computes the reference log-probs of its own rows only, cached per process in
``reference_logps.process<p>-of-<P>.npz``; process 0 prints the reports summed over hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
from flax import nnx

from jaxalign import parallel
from jaxalign.algorithms.dpo import (
    export_model,
    host_pair_batches,
    read_host_pairs,
    train_dpo,
    write_run_config,
)
from jaxalign.algorithms.rounds import run_path
from jaxalign.cli import flags
from jaxalign.data.pairs import pair_batches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "--pairs", default=None, help="preference JSONL (default: the config's data.seed_pairs)"
    )
    parser.add_argument(
        "--output-dir", default=None, help="run directory (default: the config's run.output_dir)"
    )
    parser.add_argument(
        "--save-every",
        type=flags.non_negative_int,
        default=100,
        help="checkpoint every N steps and at the end (0: at the end only)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.beta=0.05 train.epochs=1",
    )


def main(args: argparse.Namespace) -> int:
    from jaxalign.algorithms.rounds import require_file_system
    from jaxalign.config import ConfigError, load_config, to_dict
    from jaxalign.data.records import DataError, read_preference_records
    from jaxalign.loading import load

    try:
        config = load_config(args.config, args.overrides)
        require_file_system(args.output_dir or config.run.output_dir, "--output-dir")
        parallel.initialize_distributed()
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"jaxalign dpo: {e}", file=sys.stderr)
        return 2
    # Process 0 speaks for every host: the reports are summed over hosts, and every
    # host runs the same steps (the others would print the same lines again).
    if parallel.is_primary_process():
        log = lambda msg: print(msg, file=sys.stderr, flush=True)
    else:
        log = lambda msg: None
    m = config.run.mesh
    mesh = parallel.make_mesh(m.data, m.fsdp, m.tensor)
    log(parallel.describe_devices(mesh))
    if config.train.batch_size % parallel.batch_divisor(mesh):
        log(
            f"jaxalign dpo: train.batch_size={config.train.batch_size} is not a multiple of the "
            f"mesh's data x fsdp size {parallel.batch_divisor(mesh)}; change one of them"
        )
        return 2
    # On several hosts each reads and tokenises only its share; process 0 reports the sums.
    host_local = jax.process_count() > 1
    path = args.pairs or config.data.seed_pairs
    try:
        if host_local:
            records, indices, read_report = read_host_pairs(
                path, mesh, config.train.batch_size, config.data.on_bad_record
            )
        else:
            records, read_report = read_preference_records(path, config.data.on_bad_record)
    except DataError as e:
        log(f"jaxalign dpo: {e}")
        return 2
    log(read_report.summary())
    model, tokenizer = load(
        config.model.name,
        param_dtype=config.model.param_dtype,
        dtype=config.model.dtype,
        cache_dir=config.model.cache_dir,
    )
    if host_local:
        batches, pair_report = host_pair_batches(records, indices, tokenizer, config, mesh)
    else:
        batches, pair_report = pair_batches(records, tokenizer, config)
    log(pair_report.summary())
    if not batches:  # the same on every host: the plan is shared
        log("jaxalign dpo: no usable preference pairs")
        return 2
    output_dir = run_path(args.output_dir or config.run.output_dir)
    # The run as it ran: its data and folder, whatever the flags overrode.
    run_config = to_dict(
        dataclasses.replace(
            config,
            run=dataclasses.replace(config.run, algorithm="dpo", output_dir=str(output_dir)),
            data=dataclasses.replace(config.data, seed_pairs=str(path)),
        )
    )
    write_run_config(output_dir, run_config)
    graphdef = nnx.graphdef(model)
    params, last = train_dpo(
        model,
        batches,
        config.train,
        mesh,
        output_dir,
        seed=config.run.seed,
        save_every=args.save_every,
        progress=config.run.progress,
        log=log,
        host_local=host_local,
        lora_rank=config.dpo.lora_rank,
        lora_alpha=config.dpo.lora_alpha,
        lora_targets=config.dpo.lora_targets,
    )
    counts = {
        "pairs_read": read_report.read,
        "pairs_kept": read_report.kept,
        "pairs_skipped": read_report.skipped,
        "pairs_trained": pair_report.kept,
        "steps": len(batches) * config.train.epochs,
    }
    folder = export_model(
        output_dir,
        run_config,
        nnx.merge(graphdef, params),
        tokenizer,
        counts | {"final": last},
        export=config.run.export_hf != "none",
    )
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith(("train/", "rew")))
    log(f"done: {output_dir / 'model'} ({summary})")
    if folder is not None:
        log(f"model: {folder} (a Hugging Face folder, README.md card)")
    return 0
