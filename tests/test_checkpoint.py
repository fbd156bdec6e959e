"""Checkpoint round trips: a killed-and-resumed run is bit-identical to an uninterrupted one."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import checkpoint, parallel, training
from jaxalign.models.llama import ModelConfig, Transformer

TINY = ModelConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1
)
CONFIG = training.TrainConfig(learning_rate=1e-3, warmup_ratio=0.1, logp_chunk_size=8)
TOTAL = 20


def _batch(i, b=4, t=12):
    rng = np.random.default_rng(i)
    out = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(1, TINY.vocab_size, (b, t)).astype(np.int32)
        attention = (np.arange(t)[None] < rng.integers(6, t + 1, b)[:, None]).astype(np.int32)
        loss = attention.copy()
        loss[:, :3] = 0
        out |= {f"{side}_ids": ids, f"{side}_attention_mask": attention, f"{side}_loss_mask": loss}
    out["weight"] = rng.uniform(0.5, 1.5, b).astype(np.float32)
    out["smoothing"] = np.full(b, 0.1, np.float32)
    out["ref_chosen_logps"] = rng.normal(-30, 2, b).astype(np.float32)
    out["ref_rejected_logps"] = rng.normal(-30, 2, b).astype(np.float32)
    return out


def _fresh(mesh):
    """A new process's view: fresh model objects, state and step function."""
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, state, shardings = training.create_train_state(model, CONFIG, TOTAL, mesh)
    step = training.make_train_step(
        graphdef, CONFIG, mesh, training.dpo_loss_fn(CONFIG), shardings, total_steps=TOTAL
    )
    return state, shardings, step


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_resume_is_bit_identical_and_restores_onto_another_mesh(tmp_path):
    mesh = parallel.make_mesh(2, 2, 1, devices=jax.devices()[:4])
    state, _, step = _fresh(mesh)
    for i in range(TOTAL):
        state, _ = step(state, _batch(i))
    uninterrupted = _leaves(state)

    state, _, step = _fresh(mesh)
    for i in range(10):
        state, _ = step(state, _batch(i))
    with checkpoint.Checkpointer(tmp_path / "run", keep=2) as ckpt:
        ckpt.save(10, state, {"cursor": 10, "epoch": 0})
    del state, step, ckpt

    state, shardings, step = _fresh(mesh)  # the "restarted process"
    ckpt = checkpoint.Checkpointer(tmp_path / "run")
    assert ckpt.latest_step() == 10
    state, extra = ckpt.restore(target_state=state, shardings=shardings)
    assert extra == {"cursor": 10, "epoch": 0}
    for i in range(extra["cursor"], TOTAL):
        state, _ = step(state, _batch(i))
    resumed = _leaves(state)
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)

    # Onto a different mesh: 8-way tensor/fsdp split instead of 2 x 2 data/fsdp.
    other = parallel.make_mesh(1, 4, 2)
    target, other_shardings, _ = _fresh(other)
    moved, _ = ckpt.restore(10, target_state=target, shardings=other_shardings)
    assert moved.params["embed_tokens"].sharding.mesh.shape == other.shape
    assert moved.params["embed_tokens"].sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp"
    )
    ckpt.close()


def test_keep_limits_saved_steps_and_latest_step(tmp_path):
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, _, _ = _fresh(mesh)
    with checkpoint.Checkpointer(tmp_path / "k", keep=2, async_=False) as ckpt:
        assert ckpt.latest_step() is None
        for s in (1, 2, 3):
            ckpt.save(s, state, {"s": s})
        assert ckpt.all_steps() == [2, 3]
        raw, extra = ckpt.restore()
        assert extra == {"s": 3}
        np.testing.assert_array_equal(
            raw["params"]["embed_tokens"]["value"], state.params["embed_tokens"][...]
        )


def test_params_only_round_trip(tmp_path):
    model = Transformer(TINY, rngs=nnx.Rngs(3))
    params = nnx.state(model)
    checkpoint.save_params(tmp_path / "policy", params)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(TINY, rngs=nnx.Rngs(0))))
    loaded = checkpoint.load_params(tmp_path / "policy", abstract)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    model2 = nnx.merge(nnx.graphdef(model), loaded)
    np.testing.assert_array_equal(
        model2(np.ones((1, 3), np.int32))[0], model(np.ones((1, 3), np.int32))[0]
    )


def test_params_sharded_on_a_mesh_load_in_a_process_with_one_device(tmp_path):
    """Trained parameters live sharded on the run's mesh; the saved files must still load
    where that mesh does not exist (export or evaluation on one CPU)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes them on CPU)")
    import subprocess
    import sys

    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    params = nnx.state(Transformer(TINY, rngs=nnx.Rngs(3)))
    placed = parallel.place_params(params, mesh)
    checkpoint.save_params(tmp_path / "policy", placed)
    np.save(tmp_path / "embed.npy", np.asarray(params["embed_tokens"][...]))
    script = f"""
import jax, numpy as np
from flax import nnx
from jaxalign import checkpoint
from jaxalign.models.llama import ModelConfig, Transformer
config = ModelConfig(**{dataclasses.asdict(TINY)!r})
abstract = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
loaded = checkpoint.load_params({str(tmp_path / "policy")!r}, abstract)
assert len(jax.devices()) == 1
np.testing.assert_array_equal(loaded["embed_tokens"][...], np.load({str(tmp_path / "embed.npy")!r}))
print("loaded")
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded" in done.stdout


def test_bucket_urls_reach_orbax_whole_and_local_paths_absolute(monkeypatch, tmp_path):
    import os

    import orbax.checkpoint as ocp

    seen = []

    class Manager:
        def __init__(self, directory, options=None, item_names=None):
            seen.append(directory)

    class Standard:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def save(self, path, params, force=False):
            seen.append(path)

        def wait_until_finished(self):
            pass

    monkeypatch.setattr(ocp, "CheckpointManager", Manager)
    monkeypatch.setattr(ocp, "StandardCheckpointer", Standard)
    checkpoint.Checkpointer("gs://bucket/run/round_1/checkpoints")
    checkpoint.save_params("gs://bucket/run/round_1/model", {"w": np.zeros(2)})
    monkeypatch.chdir(tmp_path)
    checkpoint.save_params("rel/model", {"w": np.zeros(2)})
    assert [os.fspath(p) for p in seen] == [
        "gs://bucket/run/round_1/checkpoints",
        "gs://bucket/run/round_1/model",
        str(tmp_path / "rel" / "model"),
    ]
