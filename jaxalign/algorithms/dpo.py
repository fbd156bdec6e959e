"""Training on a fixed set of preference pairs: the loop that DPO, SPA and PLE share.

The numerical step is :func:`jaxalign.training.make_train_step`; this module is
the thin shell around it: tokenised pair batches in, epochs with a seeded
shuffle, a progress bar, metrics to the run's writer, final parameters out.

On several hosts (``jax.distributed``) every host holds the whole batch list by default
and feeds its own rows of each (fine for SPA's and PLE's small per-round sets). For a
large pair file, :func:`read_host_pairs` and :func:`host_pair_batches` let each host read
and tokenise only its share: the hosts agree on one batch plan, each builds only the rows
it feeds (``train(..., host_local=True)``), and every host still runs the same sequence
of identically shaped global batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import checkpoint, parallel, training
from jaxalign.data import pairs as pair_data
from jaxalign.data.records import DataError, ReadReport, kept_record_index, read_record_share
from jaxalign.models.llama import Transformer
from jaxalign.parallel import model_shardings, shard_host_batch, tree_to_host


@dataclasses.dataclass
class TrainResult:
    params: nnx.State
    steps: int
    skipped_steps: int
    last_metrics: dict[str, float]
    mean_metrics: dict[str, float]


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


def epoch_order(seed: int, epoch: int, num_batches: int) -> np.ndarray:
    """The batch order of ``epoch``: a permutation that depends only on ``(seed, epoch)``,
    so a resumed run visits the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(num_batches)


def _device_batch(batch: dict, mesh, global_rows: int | None = None) -> dict:
    """The global batch: every process holds ``batch`` whole and feeds only its own rows,
    or, with ``global_rows``, ``batch`` is already this process's rows of the global batch."""
    fields = training.PAIR_FIELDS + training.REFERENCE_FIELDS + ("p",)
    batch = {k: np.asarray(batch[k]) for k in fields if k in batch}
    if global_rows is None:
        return shard_host_batch(batch, mesh)
    return parallel.make_global_batch(batch, mesh, global_rows=global_rows)


def train(
    model: Transformer,
    batches: Sequence[dict],
    config: training.TrainConfig,
    mesh,
    *,
    loss_fn,
    epochs: int,
    frozen: Any = None,
    algo_state: dict | None = None,
    metrics=None,
    tag: str = "train",
    progress: bool = True,
    desc: str = "train",
    seed: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    log=print,
    host_local: bool = False,
) -> TrainResult:
    """Trains ``model`` for ``epochs`` passes over ``batches`` (order: :func:`epoch_order`).

    ``host_local``: ``batches`` are this process's rows of ``config.batch_size``-row
    global batches (:func:`host_pair_batches`; the same count and shapes on every
    process) rather than whole batches every process holds.

    With ``checkpoint_dir``, the full train state is saved every ``save_every``
    steps (0: only after the last step) and a rerun resumes from the newest
    checkpoint, reaching bit-identical parameters. ``frozen`` (e.g. an on-the-fly
    reference's parameters) is passed to every step, not trained.
    """
    total = epochs * len(batches)
    seed = config.seed if seed is None else seed
    graphdef, state, shardings = training.create_train_state(
        model, config, total, mesh, algo_state=algo_state
    )
    frozen_shardings = None
    if frozen is not None:
        frozen_shardings = model_shardings(frozen, mesh)
        frozen = jax.device_put(frozen, frozen_shardings)
    step_fn = training.make_train_step(
        graphdef,
        config,
        mesh,
        loss_fn,
        shardings,
        total_steps=total,
        frozen_shardings=frozen_shardings,
    )
    ckpt = None if checkpoint_dir is None else checkpoint.Checkpointer(checkpoint_dir)
    start = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        state, extra = ckpt.restore(target_state=state, shardings=shardings)
        start = int(extra.get("step", ckpt.latest_step()))
        log(f"resuming from step {start} of {total} ({checkpoint_dir})")
    sums: dict[str, float] = {}
    last: dict[str, float] = {}
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, unit="step")
    for step in range(start, total):
        epoch, position = divmod(step, len(batches))
        batch = _device_batch(
            batches[epoch_order(seed, epoch, len(batches))[position]],
            mesh,
            config.batch_size if host_local else None,
        )
        extra_args = () if frozen is None else (frozen,)
        state, m = step_fn(state, batch, *extra_args)
        last = {k: float(v) for k, v in jax.device_get(m).items()}
        for k, v in last.items():
            sums[k] = sums.get(k, 0.0) + v
        if metrics is not None:
            metrics.write(tag, step + 1, {"epoch": epoch, **last})
        bar.set_postfix(
            loss=f"{last['train/loss']:.4f}",
            acc=f"{last.get('rewards/accuracy', float('nan')):.2f}",
        )
        bar.update(1)
        if ckpt is not None and (
            step + 1 == total or (save_every and (step + 1) % save_every == 0)
        ):
            ckpt.save(step + 1, state, {"step": step + 1, "epoch": epoch})
    bar.close()
    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    done = total - start
    return TrainResult(
        params=tree_to_host(state.params),
        steps=total,
        skipped_steps=int(state.skipped_steps),
        last_metrics=last,
        mean_metrics={k: v / max(done, 1) for k, v in sums.items()},
    )
