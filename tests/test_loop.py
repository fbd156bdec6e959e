"""The training loop: batch order, global batches, and a killed run resuming to the same result."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_pairs import TINY, tiny_batches

from jaxalign import checkpoint, loop, parallel, training
from jaxalign.models.llama import Transformer

CONFIG = training.TrainConfig(learning_rate=1e-3, batch_size=4, logp_chunk_size=8)


def _batches():
    return tiny_batches(12)


def test_seeded_order_depends_only_on_seed_and_epoch():
    a = loop.seeded_order(0, 10)(1)
    np.testing.assert_array_equal(a, loop.seeded_order(0, 10)(1))
    np.testing.assert_array_equal(a, np.random.default_rng([0, 1]).permutation(10))
    assert sorted(a) == list(range(10))
    assert not np.array_equal(a, loop.seeded_order(0, 10)(2))


def test_stream_order_is_one_numpy_stream_replayed():
    """Epoch e of stream_order is the (e+1)-th permutation of one default_rng(seed) stream."""
    rng = np.random.default_rng(7)
    want = [rng.permutation(5) for _ in range(3)]
    order = loop.stream_order(7, 5)
    for epoch in (2, 0, 1):  # any epoch, in any order
        np.testing.assert_array_equal(order(epoch), want[epoch])


def test_device_batch_keeps_only_the_train_step_fields():
    mesh = parallel.make_mesh(2, 2, 2)
    batch = dict(_batches()[0])
    batch["sft_weight"] = np.ones(4, np.float32)
    placed = loop.device_batch(batch, mesh)
    assert set(placed) == {k for k in training.BATCH_FIELDS if k in batch}
    assert "index" not in placed and "p" in placed and "sft_weight" in placed
    np.testing.assert_array_equal(np.asarray(placed["chosen_ids"]), batch["chosen_ids"])


def _train(out=None, save_every=0, frozen=False):
    """Two epochs of DPO: reference log-probs in the batches, or a frozen on-the-fly reference."""
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batches = _batches()
    if not frozen:
        zeros = {"ref_chosen_logps": np.zeros(4, np.float32), "ref_rejected_logps": np.zeros(4)}
        batches = [{**b, **zeros} for b in batches]
    return loop.train(
        model,
        batches,
        CONFIG,
        mesh,
        loss_fn=training.dpo_loss_fn(CONFIG, graphdef),
        epochs=2,
        frozen=params if frozen else None,
        progress=False,
        seed=3,
        checkpoint_dir=out,
        save_every=save_every,
        log=lambda m: None,
    )


@pytest.mark.parametrize("frozen", [False, True], ids=["precomputed", "frozen-reference"])
def test_killed_run_resumes_to_the_same_params(tmp_path, frozen):
    """Keep only the checkpoint of step 2 of 6, rerun: bit-identical parameters, and the
    whole run's step count, last metrics and mean metrics."""
    whole = _train(frozen=frozen)
    assert whole.steps == 6 and np.isfinite(whole.last_metrics["train/loss"])
    assert set(whole.summary()) >= {"steps", "skipped_steps", "final/train/loss", "mean/train/loss"}
    _train(tmp_path, save_every=2, frozen=frozen)
    ckpt = checkpoint.Checkpointer(tmp_path, async_=False)
    assert ckpt.all_steps() == [2, 4, 6]
    for s in ckpt.all_steps():
        if s > 2:
            ckpt._manager.delete(s)
    ckpt.close()
    resumed = _train(tmp_path, save_every=2, frozen=frozen)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.steps == 6
    assert resumed.last_metrics == whole.last_metrics
    assert resumed.mean_metrics == whole.mean_metrics


def test_a_run_killed_after_its_last_checkpoint_reports_its_metrics(tmp_path):
    """The last step's checkpoint is on disk (the caller died before using the result): the
    rerun trains no step and still returns the run's parameters and metrics."""
    whole = _train(tmp_path, save_every=2)
    again = _train(tmp_path, save_every=2)
    assert again.summary() == whole.summary()
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)


def _wide_batches(width=48):
    """The tiny batches in rows twice as long as their sequences, so two share a packed row."""
    return [
        {
            k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) if v.ndim == 2 else v
            for k, v in b.items()
        }
        for b in _batches()
    ]


def _dpo_run(config, mesh, spy=None):
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss_fn = training.dpo_loss_fn(config, graphdef)
    if spy is not None:
        inner = loss_fn

        def loss_fn(model, batch, *rest):
            spy.append(batch["packed_ids"].shape if "packed_ids" in batch else None)
            return inner(model, batch, *rest)

    return loop.train(
        model,
        _wide_batches(),
        config,
        mesh,
        loss_fn=loss_fn,
        epochs=1,
        frozen=params,
        progress=False,
        seed=3,
        log=lambda m: None,
    )


def test_packed_batches_train_to_the_unpacked_result():
    """``train.pack_sequences`` feeds packed rows on a one-device mesh and trains to the
    parameters and metrics of the unpacked run; micro-batched steps and a mesh of several
    devices stay unpacked."""
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    packed, seen = _dpo_run(CONFIG, mesh, spy := []), spy
    unpacked = _dpo_run(dataclasses.replace(CONFIG, pack_sequences=False), mesh)
    assert seen and all(shape == (4, 48) for shape in seen)  # 8 sequences, two per row
    for a, b in zip(jax.tree.leaves(packed.params), jax.tree.leaves(unpacked.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key, value in unpacked.mean_metrics.items():
        np.testing.assert_allclose(packed.mean_metrics[key], value, rtol=1e-4, atol=1e-6)
    micro, several = [], []
    _dpo_run(dataclasses.replace(CONFIG, micro_batches=2), mesh, micro)
    _dpo_run(CONFIG, parallel.make_mesh(2, 1, 1, devices=jax.devices()[:2]), several)
    assert micro and several and not any(micro) and not any(several)
