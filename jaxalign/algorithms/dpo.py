"""Training on a fixed set of preference pairs: the loop that DPO, SPA and PLE share.

The numerical step is :func:`jaxalign.training.make_train_step`; this module is
the thin shell around it: tokenised pair batches in, epochs with a seeded
shuffle, a progress bar, metrics to the run's writer, final parameters out.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import checkpoint, training
from jaxalign.data import pairs as pair_data
from jaxalign.models.llama import Transformer
from jaxalign.parallel import model_shardings, shard_host_batch, tree_to_host


@dataclasses.dataclass
class TrainResult:
    params: nnx.State
    steps: int
    skipped_steps: int
    last_metrics: dict[str, float]
    mean_metrics: dict[str, float]


def pair_batches(records: Sequence[dict], tokenizer, config) -> tuple[list[dict], Any]:
    """Tokenised, bucketed pair batches of ``config.train.batch_size`` pairs from text records.

    Records may carry ``chosen_eos``/``rejected_eos`` (False for a response cut
    at the token limit, so no EOS is appended) and ``p`` (the judge's
    preference probability, kept as a batch field for SPA's label modes).
    """
    return pair_data.build_pair_batches(
        records,
        tokenizer,
        batch_size=config.train.batch_size,
        max_prompt_tokens=config.data.max_prompt_tokens,
        max_response_tokens=config.data.max_response_tokens,
        use_chat_template=config.data.use_chat_template,
    )


def with_reference_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batches: Sequence[dict],
    config: training.TrainConfig,
    progress: bool = False,
) -> list[dict]:
    """Each batch with ``ref_chosen_logps``/``ref_rejected_logps`` under ``params`` added."""
    out = []
    for batch in tqdm(batches, desc="reference log-probs", disable=not progress):
        ref = training.compute_reference_logps(graphdef, params, batch, config.logp_chunk_size)
        out.append({**batch, **{k: np.asarray(v) for k, v in ref.items()}})
    return out


def response_logps(
    graphdef: nnx.GraphDef, params: nnx.State, records: Sequence[dict], tokenizer, config
) -> np.ndarray:
    """``[N, 2]`` summed log-probs of each record's (``chosen``, ``rejected``) response.

    Used by judges: the two slots are just "first" and "second" candidate here.
    """
    batches, report = pair_batches(records, tokenizer, config)
    if report.kept != len(records):
        raise ValueError(
            f"{len(records) - report.kept} of {len(records)} candidate pairs could not be "
            "tokenised for judging; see the pair report"
        )
    out = np.zeros((len(records), 2), np.float64)
    for batch in batches:
        ref = training.compute_reference_logps(
            graphdef, params, batch, config.train.logp_chunk_size
        )
        rows = np.asarray(batch["index"])
        valid = rows >= 0
        out[rows[valid], 0] = np.asarray(ref["ref_chosen_logps"])[valid]
        out[rows[valid], 1] = np.asarray(ref["ref_rejected_logps"])[valid]
    return out


def response_token_counts(records: Sequence[dict], tokenizer, config) -> np.ndarray:
    """``[N, 2]`` tokens scored per (``chosen``, ``rejected``) response, as :func:`response_logps`
    scores them (after truncation, EOS included when the response had one)."""
    batches, _ = pair_batches(records, tokenizer, config)
    out = np.zeros((len(records), 2), np.int64)
    for batch in batches:
        rows = np.asarray(batch["index"])
        valid = rows >= 0
        out[rows[valid], 0] = np.asarray(batch["chosen_loss_mask"]).sum(1)[valid]
        out[rows[valid], 1] = np.asarray(batch["rejected_loss_mask"]).sum(1)[valid]
    return out


def epoch_order(seed: int, epoch: int, num_batches: int) -> np.ndarray:
    """The batch order of ``epoch``: a permutation that depends only on ``(seed, epoch)``,
    so a resumed run visits the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(num_batches)


def _device_batch(batch: dict, mesh) -> dict:
    """The global batch; every process holds ``batch`` whole and feeds only its own rows."""
    fields = training.PAIR_FIELDS + training.REFERENCE_FIELDS + ("p",)
    return shard_host_batch({k: np.asarray(batch[k]) for k in fields if k in batch}, mesh)


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
) -> TrainResult:
    """Trains ``model`` for ``epochs`` passes over ``batches`` (order: :func:`epoch_order`).

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
        batch = _device_batch(batches[epoch_order(seed, epoch, len(batches))[position]], mesh)
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
