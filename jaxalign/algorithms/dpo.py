"""DPO (Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290) on a pair file.

    L = −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])

with the reference ``π_ref`` the starting model. The algorithm is two steps:

1. the reference log-probs of every pair, computed once under the starting
   parameters (:func:`jaxalign.scoring.with_reference_logps`) and cached in the run
   directory (:func:`reference_logps`), so training holds one model;
2. ``train.epochs`` passes of :func:`jaxalign.loop.train` with the DPO loss
   (:func:`jaxalign.training.dpo_loss_fn`, or its IPO/hinge/robust variants), resumable
   from checkpoints; the final parameters go to ``<output_dir>/model``.

:func:`train_dpo` runs both; ``jaxalign dpo`` (:mod:`jaxalign.cli.dpo`) reads the
data and calls it, then :func:`export_model` writes ``<output_dir>/model_hf`` (a Hugging
Face folder with a model card) and ``summary.json``. The output directory also holds the
run's ``config.yaml`` (:func:`write_run_config`), so ``jaxalign eval --model <output_dir>``
and ``jaxalign export <output_dir>`` rebuild the model from the base it names. SPA's seed
round is the same computation, run by :mod:`jaxalign.algorithms.spa` from the same
service modules.

On several hosts (``jax.distributed``) every host holds the whole batch list by default
and feeds its own rows of each. For a large pair file, :func:`read_host_pairs` and
:func:`host_pair_batches` let each host read and tokenise only its share: the hosts
agree on one batch plan, each builds only the rows it feeds (``host_local=True``), and
every host still runs the same sequence of identically shaped global batches.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from jaxalign import checkpoint, loop, parallel, training
from jaxalign.algorithms import stages
from jaxalign.algorithms.rounds import (
    CONFIG_FILE,
    RunPath,
    atomic_write_text,
    run_path,
    write_bytes,
)
from jaxalign.data import pairs as pair_data
from jaxalign.data.records import DataError, ReadReport, kept_record_index, read_record_share
from jaxalign.models import lora
from jaxalign.models.llama import Transformer
from jaxalign.report import MetricsWriter
from jaxalign.scoring import with_reference_logps


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
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = lora.ALL_LINEAR,
) -> tuple[nnx.State, dict]:
    """Trains ``model`` on pair ``batches`` with resumable checkpoints in ``output_dir``.

    Returns the final parameters (on ``mesh``, as trained) and the last step's metrics.
    A rerun with the same arguments continues from the newest checkpoint. ``output_dir``
    may be a local path or a ``gs://`` URL (checkpoints, reference cache, metrics and
    model). ``host_local``: ``batches`` are this process's rows only
    (``host_pair_batches``); the reference log-probs are then computed and cached per
    process.

    ``lora_rank`` r > 0: LoRA adapters of rank r on the ``lora_targets`` kernels train
    instead of every weight (``A`` drawn from ``seed``, ``B = 0``, scale α/r); ``model``
    stays frozen and is the reference. The adapters go to ``<output_dir>/lora`` and the
    returned parameters are ``model``'s with them merged in.
    """
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
    trained, train_config, loss_fn, frozen = model, config, training.dpo_loss_fn(config), None
    if lora_rank:
        adapters = lora.LoraAdapters(
            model, rank=lora_rank, targets=tuple(lora_targets), rngs=nnx.Rngs(seed)
        )
        scaling = lora.lora_scaling(lora_rank, lora_alpha)
        train_config, loss_fn, frozen = stages.lora_training(model, config, loss_fn, scaling)
        trained = adapters
    result = loop.train(
        trained,
        batches,
        train_config,
        mesh,
        loss_fn=loss_fn,
        epochs=config.epochs,
        frozen=frozen,
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
    if not lora_rank:
        checkpoint.save_params(out / "model", result.params)
        return result.params, result.last_metrics
    checkpoint.save_params(out / "lora", result.params)
    return stages.merge_adapters(params, result.params, scaling, mesh), result.last_metrics


def write_run_config(output_dir: str | os.PathLike, config: dict) -> None:
    """Writes the run's ``config.yaml`` (``run.algorithm: dpo``), which names the model that
    training starts from: what rebuilds the trained model from ``model/``."""
    import yaml

    atomic_write_text(run_path(output_dir) / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))


def export_model(
    output_dir: str | os.PathLike,
    config: dict,
    model: Transformer,
    tokenizer,
    counts: dict,
    *,
    export: bool = True,
) -> RunPath | None:
    """The end of a DPO run: ``summary.json`` (the data ``counts``: pairs read, kept,
    skipped, trained on, steps) and, with ``export``, ``model_hf/``: the trained ``model`` as
    a Hugging Face folder with a model card. Returns the folder (``None`` without export)."""
    out = run_path(output_dir)
    atomic_write_text(out / "summary.json", json.dumps(counts, indent=1))
    if not export:
        return None
    facts = stages.card_facts(config, counts, None, name=out.name)
    stages.write_hf_folder(out / stages.EXPORT_FOLDER, model, tokenizer, facts)
    return out / stages.EXPORT_FOLDER


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


def read_host_pairs(
    path: str, mesh, batch_size: int, on_bad_record: str = "error", layout: str = "pairs"
) -> tuple[list[dict], np.ndarray, ReadReport]:
    """This host's share of a pair file, each record's global index, and all hosts' report.

    Host share ``q`` of ``Q`` (:func:`jaxalign.parallel.data_shard`) keeps records
    ``q, q + Q, ...``; processes that feed the same rows read the same share. The index
    of a record is its place among the whole file's kept records, as one host reading
    everything would number it. A bad record found by any host stops every host with the
    message one host reading everything would give: that of the earliest bad record.
    All processes must call this together.
    """
    share, shares = parallel.data_shard(mesh, batch_size)
    error = None
    try:
        records, positions, report = read_record_share(
            path, layout, on_bad_record, shard=(share, shares)
        )
    except DataError as e:  # the other hosts must hear of it, not wait for this one
        error = {"message": str(e), "position": -1 if e.position is None else e.position}
        records, positions, report = [], np.zeros(0, np.int64), ReadReport(path)
    hosts = parallel.allgather_json(
        {
            "share": share,
            "error": error,
            "report": report.to_dict(),
            "total": report.read + report.others,
        }
    )
    errors = [h["error"] for h in hosts if h["error"]]
    if errors:
        first = min(errors, key=lambda e: e["position"])  # -1: the file itself is at fault
        raise DataError(first["message"], first["position"] if first["position"] >= 0 else None)
    one_per_share = {h["share"]: h for h in hosts}
    total = ReadReport.combine(
        [ReadReport.from_dict(one_per_share[q]["report"]) for q in sorted(one_per_share)]
    )
    if total.skipped == 0:  # nothing skipped: a record's index is its position in the file
        return records, positions, total
    # Which positions were kept is spread over the hosts: gather each share's kept mask.
    count = hosts[0]["total"]
    mask = np.zeros(math.ceil(count / shares), np.uint8)  # uint8: collectives know it
    mask[(positions - share) // shares] = 1
    masks = parallel.allgather_array(mask)
    by_share = {h["share"]: masks[q] for q, h in enumerate(hosts)}
    index = kept_record_index([by_share[q] for q in range(shares)], count)
    return records, index[positions], total


def host_pair_batches(
    records: Sequence[dict], indices: Sequence[int], tokenizer, config, mesh
) -> tuple[list[dict], pair_data.PairReport]:
    """This host's rows of the pair batches that all hosts run together, and the summed report.

    ``records``/``indices`` from :func:`read_host_pairs`. Every host tokenises and
    buckets only its records; from all hosts' bucket counts they agree on one plan
    (:func:`jaxalign.data.pairs.plan_pair_batches`), so batch ``k`` has the same shape on
    every host. Each batch has ``len(process_rows(mesh, batch_size))`` rows, weight-0
    padding where this host has no pair left; ``index`` holds global record indices.
    Train on them with ``train(..., host_local=True)``. All processes call this together.
    """
    batch_size = config.train.batch_size
    rows = len(parallel.process_rows(mesh, batch_size))
    share, _ = parallel.data_shard(mesh, batch_size)
    by_bucket, report = pair_data.bucket_pairs(
        records,
        tokenizer,
        max_prompt_tokens=config.data.max_prompt_tokens,
        max_response_tokens=config.data.max_response_tokens,
        use_chat_template=config.data.use_chat_template,
        indices=indices,
    )
    hosts = parallel.allgather_json({"share": share, "rows": rows, "report": report.to_dict()})
    if len({h["rows"] for h in hosts}) != 1:
        raise ValueError(
            f"processes feed different numbers of rows per batch ({[h['rows'] for h in hosts]}); "
            "use a mesh whose data x fsdp blocks spread evenly over the processes"
        )
    one_per_share = {h["share"]: pair_data.PairReport.from_dict(h["report"]) for h in hosts}
    plan = pair_data.plan_pair_batches([r.buckets for r in one_per_share.values()], rows)
    batches = pair_data.pack_pair_batches(by_bucket, plan, rows, pair_data.pad_token_id(tokenizer))
    total = pair_data.PairReport.combine([one_per_share[q] for q in sorted(one_per_share)])
    total.padding_pairs = len(plan) * batch_size - total.kept
    return batches, total
