"""The training loop: epochs over fixed batches, resumable, with metrics and a progress bar.

DPO, SPA's rounds and PLE's SFT and iteration training all run this one loop. The
numerical step is :func:`jaxalign.training.make_train_step` (pure, jitted, sharded);
what is around it lives here:

- **order**: epoch ``e`` visits the batches in ``order(e)``, a permutation that is a
  pure function of the seed and ``e`` (:func:`seeded_order` by default), so a resumed
  run visits the same batches as an uninterrupted one;
- **global batches**: every process holds each batch whole and feeds its own rows of
  it, or (``host_local``) holds only its own rows of each global batch
  (:func:`device_batch`);
- **checkpoints**: with a ``checkpoint_dir``, the whole train state is saved every
  ``save_every`` steps and after the last; a rerun resumes from the newest checkpoint
  and reaches bit-identical parameters and the same metrics;
- **metrics**: every step's metrics go to the run's :class:`jaxalign.report.MetricsWriter`;
  the result holds the last step's and the mean of each metric over the run's steps, and
  a loss's per-pair metrics (``pairs/...``, e.g. SPA's flags) as one row per pair and step,
  keyed by the batch's record ``index``. A step's metrics are read after the next step is
  dispatched, so the host never waits for the device between steps; the numbers logged
  are the same;
- **throughput**: each logged row also has ``perf/step_seconds``, ``perf/tokens_per_second``,
  ``perf/model_tflops_per_second`` and ``perf/mfu`` (:mod:`jaxalign.throughput`); they
  depend on the machine and its load, so they stay out of the result's metrics (and of
  ``state.json``), and a resumed run's rows differ from an uninterrupted one's only there.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import checkpoint, parallel, throughput, training
from jaxalign.data.iteration import epoch_order
from jaxalign.data.packing import cheapest_layout, pack_pair_rows, pair_sequences, row_multiple
from jaxalign.loading import default_cache_dir
from jaxalign.models.llama import Transformer
from jaxalign.parallel import model_shardings, place_params, shard_host_batch

Order = Callable[[int], np.ndarray]  # epoch -> permutation of the batch indices


@dataclasses.dataclass
class TrainResult:
    params: nnx.State
    steps: int
    skipped_steps: int
    last_metrics: dict[str, float]
    mean_metrics: dict[str, float]
    # One row per real pair and step, for a loss's per-pair metrics (``pairs/...``):
    # {"index": the batch row's record index, "step": 1-based, "epoch", <metric>: value}.
    per_pair: list[dict] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """``{steps, skipped_steps, final/<metric>, mean/<metric>}``, JSON-able."""
        out: dict[str, Any] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        out.update({f"final/{k}": v for k, v in self.last_metrics.items()})
        out.update({f"mean/{k}": v for k, v in self.mean_metrics.items()})
        return out


def seeded_order(seed: int, num_batches: int) -> Order:
    """Epoch ``e`` visits :func:`jaxalign.data.iteration.epoch_order` ``(num_batches, seed, e)``:
    a permutation seeded with ``(seed, e)``, so any epoch is computed without the others."""
    return lambda epoch: epoch_order(num_batches, seed, epoch)


def stream_order(seed: int, num_batches: int) -> Order:
    """Epoch ``e`` visits the ``(e+1)``-th permutation drawn from one ``numpy`` stream seeded
    with ``seed`` (PLE's order). Recomputed by replaying the draws before it, so it too
    depends only on ``(seed, e)``."""

    def order(epoch: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        for _ in range(epoch):
            rng.permutation(num_batches)
        return rng.permutation(num_batches)

    return order


def device_batch(batch: dict, mesh, global_rows: int | None = None) -> dict:
    """The global batch of the train-step fields (:data:`jaxalign.training.BATCH_FIELDS`)
    in ``batch``: every process holds ``batch`` whole and feeds only its own rows, or,
    with ``global_rows``, ``batch`` is already this process's rows of the global batch."""
    batch = {k: np.asarray(batch[k]) for k in training.BATCH_FIELDS if k in batch}
    if global_rows is None:
        return shard_host_batch(batch, mesh)
    return parallel.make_global_batch(batch, mesh, global_rows=global_rows)


def _packed(
    batches: Sequence[dict], batch_size: int, position_cost: Callable[[int], float]
) -> list[dict]:
    """Each pair batch packed once for the run (:func:`jaxalign.data.packing.pack_pair_rows`)
    in one row length, so only the row count varies between them; other batches (SFT rows
    alone) as they are. The row length is the run's longest bucket ``T``, or ``2T`` or ``4T``
    in half or a quarter of the rows, whichever computes the run's batches in the fewest
    FLOPs (:func:`jaxalign.data.packing.cheapest_layout`): never more positions than the
    longest unpacked batch."""
    pairs = [b for b in batches if "chosen_ids" in b]
    if not pairs:
        return list(batches)
    longest = max(b["chosen_ids"].shape[1] for b in pairs)
    groups = [[len(ids) for _, ids, _ in pair_sequences(b)] for b in pairs]
    length, rows = cheapest_layout(groups, longest, 2 * batch_size, position_cost)
    step = row_multiple(rows)
    return [pack_pair_rows(b, step, length, rows) if "chosen_ids" in b else b for b in batches]


def train(
    model: Transformer | nnx.Module,
    batches: Sequence[dict],
    config: training.TrainConfig,
    mesh,
    *,
    loss_fn: training.LossFn,
    epochs: int,
    frozen: Any = None,
    algo_state: dict | None = None,
    metrics=None,
    tag: str = "train",
    progress: bool = True,
    desc: str = "train",
    seed: int | None = None,
    order: Order | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    log: Callable[[str], None] = print,
    host_local: bool = False,
    frozen_forward: bool = False,
) -> TrainResult:
    """Trains ``model`` for ``epochs`` passes over ``batches``; returns the final parameters.

    - ``loss_fn``, ``algo_state`` and ``frozen`` as for :func:`jaxalign.training.make_train_step`:
      ``frozen`` (e.g. an on-the-fly reference's parameters, or LoRA's base) is passed
      to every step, placed once as training places parameters, never trained;
      ``frozen_forward``: the loss runs ``frozen`` forward over every token (an on-the-fly
      reference), counted in the logged model FLOPs (:func:`jaxalign.throughput.model_flops`);
    - ``order``: epoch -> batch permutation (default :func:`seeded_order` of ``seed``,
      itself ``config.seed`` by default);
    - ``host_local``: ``batches`` are this process's rows of ``config.batch_size``-row
      global batches (the same count and shapes on every process), rather than whole
      batches every process holds;
    - ``checkpoint_dir``: the full train state is saved every ``save_every`` steps (0:
      only after the last step) and a rerun resumes from the newest checkpoint;
    - ``config.pack_sequences``: each batch's pair rows are packed into fewer rows before
      the step (:func:`jaxalign.data.packing.pack_pair_rows`), the same step on less
      padding; on a one-device mesh, with ``config.micro_batches`` 1, batches not host-local;
    - ``metrics``: a writer whose ``write(tag, step, scalars)`` gets every step's metrics.
    """
    total = epochs * len(batches)
    seed = config.seed if seed is None else seed
    order = seeded_order(seed, len(batches)) if order is None else order
    graphdef, state, shardings = training.create_train_state(
        model, config, total, mesh, algo_state=algo_state
    )
    frozen_shardings = None
    if frozen is not None:
        frozen_shardings = model_shardings(frozen, mesh)
        frozen = place_params(frozen, mesh)
    step_fn = training.make_train_step(
        graphdef,
        config,
        mesh,
        loss_fn,
        shardings,
        total_steps=total,
        frozen_shardings=frozen_shardings,
    )
    # Metrics may differ from batch to batch (e.g. PLE's single-kind batches), so each
    # mean is over the steps that reported it. The running sums travel with the
    # checkpoints, so a resumed run reports the whole run's means.
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    last: dict[str, float] = {}
    per_pair: list[dict] = []
    ckpt = None if checkpoint_dir is None else checkpoint.Checkpointer(checkpoint_dir)
    start = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        state, extra = ckpt.restore(target_state=state, shardings=shardings)
        start = int(extra.get("step", ckpt.latest_step()))
        running = extra.get("metrics", {})
        sums, counts, last = (dict(running.get(k, {})) for k in ("sums", "counts", "last"))
        per_pair = list(running.get("pairs", []))
        log(f"resuming from step {start} of {total} ({checkpoint_dir})")
    extra_args = () if frozen is None else (frozen,)
    size = throughput.parameter_count(state.params)
    if frozen is not None:  # LoRA's base, or an on-the-fly reference: the larger model
        size = max(size, throughput.parameter_count(frozen))
    width = throughput.attention_width(model)
    peak = throughput.peak_flops(mesh.devices.flat, default_cache_dir())
    hosts = jax.process_count() if host_local else 1
    # Packed rows cannot be split into micro-batches by pair, host-local batches would pack
    # into different row counts on different hosts, and a packed step over several devices
    # sums each sequence's log-probs across them: on XLA:CPU's in-process collectives (8
    # host devices) that step deadlocked, devices waiting in different collectives. Those
    # train unpacked.
    pack = config.pack_sequences and not host_local and config.micro_batches == 1 and mesh.size == 1
    if pack:
        cost = throughput.position_cost(model, size)
        fed_batches = _packed(batches, config.batch_size, cost)
    else:
        fed_batches = batches
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, unit="step")
    clock = time.perf_counter()

    def record(step: int, epoch: int, host_batch: dict, m: dict) -> None:
        """Reads step ``step``'s metrics (waiting for it), logs them and adds them up."""
        nonlocal last, clock
        m = jax.device_get(m)
        now = time.perf_counter()
        tokens = throughput.batch_tokens(host_batch) * hosts
        squares = throughput.batch_squares(host_batch) * hosts
        flops = throughput.model_flops(tokens, squares, size, width, 4 if frozen_forward else 3)
        perf = throughput.step_throughput(now - clock, tokens, flops, peak)
        clock = now
        pair_metrics = {k: np.asarray(v) for k, v in m.items() if training.is_per_pair(k)}
        if pair_metrics:
            mine = mesh if host_local else None
            per_pair.extend(pair_rows(host_batch, pair_metrics, step + 1, epoch, mine))
        last = {k: float(v) for k, v in m.items() if not training.is_per_pair(k)}
        for k, v in last.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        if metrics is not None:
            metrics.write(tag, step + 1, {"epoch": epoch, **last, **perf})
        postfix = {"loss": f"{last['train/loss']:.4f}"}
        if "rewards/accuracy" in last:
            postfix["acc"] = f"{last['rewards/accuracy']:.2f}"
        postfix["tok/s"] = f"{perf['perf/tokens_per_second']:.0f}"
        bar.set_postfix(postfix)
        bar.update(1)

    pending = None  # the step dispatched last, whose metrics are not read yet
    for step in range(start, total):
        epoch, position = divmod(step, len(batches))
        index = order(epoch)[position]
        host_batch = batches[index]
        batch = device_batch(fed_batches[index], mesh, config.batch_size if host_local else None)
        state, m = step_fn(state, batch, *extra_args)
        if pending is not None:
            record(*pending)  # the previous step's, while this one runs
        pending = (step, epoch, host_batch, m)
        if ckpt is not None and (
            step + 1 == total or (save_every and (step + 1) % save_every == 0)
        ):
            record(*pending)
            pending = None
            # Copies: the save may serialise in the background while the sums move on.
            running = {
                "sums": dict(sums),
                "counts": dict(counts),
                "last": dict(last),
                "pairs": list(per_pair),
            }
            ckpt.save(step + 1, state, {"step": step + 1, "epoch": epoch, "metrics": running})
    if pending is not None:
        record(*pending)
    bar.close()
    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    return TrainResult(
        params=state.params,  # on the devices, as trained: the next stage reuses them
        steps=total,
        skipped_steps=int(state.skipped_steps),
        last_metrics=last,
        mean_metrics={k: v / counts[k] for k, v in sums.items()},
        per_pair=per_pair,
    )


def pair_rows(
    batch: dict, pair_metrics: dict[str, np.ndarray], step: int, epoch: int, host_mesh=None
) -> list[dict]:
    """One row per real pair (``index >= 0``) of ``batch`` with its per-pair metric values.

    The metrics cover the global batch's rows. ``host_mesh``: ``batch`` holds only this
    process's rows of the global batch (host-local batches), the rows it feeds on that
    mesh (:func:`jaxalign.parallel.process_rows`)."""
    index = np.asarray(batch["index"])
    rows = np.arange(len(index))
    if host_mesh is not None:
        global_rows = next(iter(pair_metrics.values())).shape[0]
        rows = parallel.process_rows(host_mesh, global_rows)
    out = []
    for r, i in zip(rows, index, strict=True):
        if i < 0:
            continue
        row = {"index": int(i), "step": step, "epoch": epoch}
        prefix = training.PER_PAIR_PREFIX
        row.update({name.removeprefix(prefix): float(v[r]) for name, v in pair_metrics.items()})
        out.append(row)
    return out
