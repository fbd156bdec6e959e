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
parameters are written to ``<output_dir>/model`` (``checkpoint.load_params``).

With several processes (``jax.distributed``) each host reads and tokenises only its
share of the pair file (``algorithms.dpo.read_host_pairs``/``host_pair_batches``) and
computes the reference log-probs of its own rows only, cached per process in
``reference_logps.process<p>-of-<P>.npz``; process 0 prints the reports summed over hosts.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from jaxalign import checkpoint, parallel, training
from jaxalign.algorithms.dpo import (
    host_pair_batches,
    pair_batches,
    read_host_pairs,
    train,
    with_reference_logps,
)
from jaxalign.algorithms.rounds import run_path, write_bytes
from jaxalign.cli import flags
from jaxalign.models.llama import Transformer


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


def reference_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batches: Sequence[dict],
    cache: str | os.PathLike,
    config: training.TrainConfig,
    progress: bool = True,
    mesh=None,
) -> list[dict]:
    """``batches`` with ``ref_chosen_logps``/``ref_rejected_logps``, computed once and cached.

    ``mesh``: compute them sharded over the mesh (every process holding the same
    ``batches``); ``None`` for host-local batches, computed on this process alone.

    The reference is the starting model, so the cache at ``cache`` is reused on
    resume as long as it holds the same number of pairs per batch and the same
    record ``index`` per row (so a cache of other data or another host layout is
    recomputed, never misread).
    """

    def matches(saved) -> bool:
        names = set(saved.files)
        if sum(n.startswith("chosen_") for n in names) != len(batches):
            return False
        for i, b in enumerate(batches):
            if f"chosen_{i}" not in names or saved[f"chosen_{i}"].shape != b["weight"].shape:
                return False
            if f"index_{i}" in names and "index" in b:
                if not np.array_equal(saved[f"index_{i}"], b["index"]):
                    return False
        return True

    cache = run_path(cache)
    if cache.exists():
        saved = np.load(io.BytesIO(cache.read_bytes()))
        if matches(saved):
            return [
                {
                    **b,
                    "ref_chosen_logps": saved[f"chosen_{i}"],
                    "ref_rejected_logps": saved[f"rejected_{i}"],
                }
                for i, b in enumerate(batches)
            ]
    out = with_reference_logps(graphdef, params, batches, config, progress, mesh)
    arrays = {}
    for i, batch in enumerate(out):
        arrays[f"chosen_{i}"] = batch["ref_chosen_logps"]
        arrays[f"rejected_{i}"] = batch["ref_rejected_logps"]
        if "index" in batch:
            arrays[f"index_{i}"] = np.asarray(batch["index"])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(cache, buffer.getvalue())  # every process its own file: no process gating
    return out


def reference_cache_name(host_local: bool = False) -> str:
    """The reference log-prob cache's file name: one per process when each holds its own rows.

    Each process caches only the rows it feeds (no gathering, no shared file to race
    on); the process count is in the name, so a single-process cache or one of another
    layout is never read in its place.
    """
    if not host_local:
        return "reference_logps.npz"
    return f"reference_logps.process{jax.process_index()}-of-{jax.process_count()}.npz"


def train_dpo(
    model: Transformer,
    batches: Sequence[dict],
    config: training.TrainConfig,
    mesh,
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    save_every: int = 100,
    progress: bool = True,
    log: Callable[[str], None] = print,
    host_local: bool = False,
) -> tuple[nnx.State, dict]:
    """Trains ``model`` on pair ``batches`` with resumable checkpoints in ``output_dir``.

    Returns the final parameters and the last step's metrics. A rerun with the
    same arguments continues from the newest checkpoint. ``output_dir`` may be a
    local path or a ``gs://`` URL (checkpoints, reference cache, metrics and model).
    ``host_local``: ``batches`` are this process's rows only (``host_pair_batches``);
    the reference log-probs are then computed and cached per process.
    """
    from jaxalign.report import MetricsWriter

    out = run_path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphdef, params = nnx.split(model)
    batches = reference_logps(
        graphdef,
        params,
        batches,
        out / reference_cache_name(host_local),
        config,
        progress,
        None if host_local else mesh,
    )
    has_tb = importlib.util.find_spec("tensorboardX") is not None
    if not has_tb:
        log("tensorboardX is not installed: metrics go to metrics.jsonl only")
    writer = MetricsWriter(out / "metrics.jsonl", str(out / "tensorboard") if has_tb else None)
    result = train(
        model,
        batches,
        config,
        mesh,
        loss_fn=training.dpo_loss_fn(config),
        epochs=config.epochs,
        metrics=writer,
        tag="dpo",
        progress=progress,
        desc="dpo",
        seed=seed,
        checkpoint_dir=out / "checkpoints",
        save_every=save_every,
        log=log,
        host_local=host_local,
    )
    writer.close()
    checkpoint.save_params(out / "model", result.params)
    return result.params, result.last_metrics


def main(args: argparse.Namespace) -> int:
    from jaxalign.algorithms.rounds import require_file_system
    from jaxalign.config import ConfigError, load_config
    from jaxalign.data.records import DataError, read_preference_records
    from jaxalign.models.registry import load

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
    _, last = train_dpo(
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
    )
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith(("train/", "rew")))
    log(f"done: {output_dir / 'model'} ({summary})")
    return 0
