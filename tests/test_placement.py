"""A stage moves the model's weights to the devices once, not once per batch.

Sampling, the judge's and the reference's log-prob passes and training each run many
batches; each must place the parameters (with the training shardings on a mesh) once and
hand the placed arrays to every batch. The count is of the embedding matrix, the one
parameter of its shape, going through ``jax.device_put``. A jitted call given host arrays
would copy them implicitly, which that count cannot see, so the per-batch entry points
(``sampling.generate``, ``training.compute_reference_logps``) are also watched for
parameters that are not device arrays.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_pairs import TINY, CharTokenizer, tiny_batches

from jaxalign import loop, parallel, sampling, scoring, training
from jaxalign.generation import sample_texts
from jaxalign.models.llama import Transformer
from jaxalign.sampling import SamplingConfig

EMBED_SHAPE = (TINY.vocab_size, TINY.hidden_size)


class DecodingTokenizer(CharTokenizer):
    eos_token_ids = (2,)

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def host_model():
    """The tiny model with every parameter a host (numpy) array, as stages hand them on."""
    graphdef, state = nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))
    return graphdef, parallel.tree_to_host(state)


@pytest.fixture
def weight_moves(monkeypatch):
    """A list that gets one entry per ``jax.device_put`` that carries the embedding."""
    moves = []
    real = jax.device_put

    def counting(x, *args, **kwargs):
        leaves = jax.tree.leaves(x)
        moves.extend(leaf.shape for leaf in leaves if np.shape(leaf) == EMBED_SHAPE)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting)
    return moves


@pytest.fixture
def host_params_seen(monkeypatch):
    """A list that gets, per call of a per-batch entry point, its host-array parameters."""
    seen = []

    def watch(module, name, params_of):
        real = getattr(module, name)

        def watched(*args, **kwargs):
            leaves = jax.tree.leaves(params_of(*args))
            seen.append(sum(not isinstance(x, jax.Array) for x in leaves))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, watched)

    watch(sampling, "generate", lambda model, *rest: nnx.state(model))
    watch(training, "compute_reference_logps", lambda graphdef, params, *rest: params)
    watch(scoring, "_packed_sums", lambda graphdef, params, *rest: params)
    return seen


def mesh_or_none(kind):
    if kind == "mesh":
        if len(jax.devices()) < 8:
            pytest.skip("needs 8 devices (tests/conftest.py fakes them on CPU)")
        return parallel.make_mesh(data=2, fsdp=2, tensor=2)
    return None


@pytest.mark.parametrize("kind", ["mesh", "no mesh"])
def test_sampling_places_the_weights_once_for_all_batches(
    host_model, weight_moves, host_params_seen, kind
):
    mesh = mesh_or_none(kind)
    graphdef, state = host_model
    prompts = [f"question {i}?" for i in range(12)]
    out = sample_texts(
        nnx.merge(graphdef, state),
        DecodingTokenizer(),
        prompts,
        SamplingConfig(max_new_tokens=4, n=2),
        seed=0,
        batch_size=4,  # 3 batches
        mesh=mesh,
        progress=False,
    )
    assert len(out) == 12 and all(len(group) == 2 for group in out)
    assert len(weight_moves) == 1
    assert host_params_seen == [0, 0, 0]


def test_sampling_keeps_fsdp_shardings(host_model):
    """Placed parameters keep their FSDP/tensor shardings: the sampler does not replicate."""
    mesh = mesh_or_none("mesh")
    graphdef, state = host_model
    placed = parallel.place_params(state, mesh)
    embed = [x for x in jax.tree.leaves(placed) if x.shape == EMBED_SHAPE][0]
    assert not embed.sharding.is_fully_replicated
    assert parallel.place_params(placed, mesh) is not placed  # a new tree ...
    again = jax.tree.leaves(parallel.place_params(placed, mesh))
    assert all(a is b for a, b in zip(again, jax.tree.leaves(placed), strict=True))  # same arrays


@pytest.mark.parametrize("kind", ["mesh", "no mesh"])
def test_reference_pass_places_the_weights_once(host_model, weight_moves, host_params_seen, kind):
    mesh = mesh_or_none(kind)
    graphdef, state = host_model
    batches = tiny_batches(n=24, batch_size=4)  # 6 batches
    config = training.TrainConfig(logp_chunk_size=16)
    scored = scoring.with_reference_logps(graphdef, state, batches, config, mesh=mesh)
    assert len(scored) == len(batches)
    assert len(weight_moves) == 1
    if mesh is None:  # one device: every sequence packed, in fewer calls than batches
        assert host_params_seen and host_params_seen == [0] * len(host_params_seen)
    else:
        assert host_params_seen == [0] * len(batches)


def _train(graphdef, state, batches, config, mesh, epochs, frozen=None):
    return loop.train(
        nnx.merge(graphdef, state),
        batches,
        config,
        mesh,
        loss_fn=training.dpo_loss_fn(config, graphdef),
        epochs=epochs,
        frozen=frozen,
        progress=False,
        log=lambda m: None,
    )


@pytest.mark.parametrize("frozen", [False, True], ids=["precomputed", "frozen-reference"])
def test_training_places_policy_and_reference_once(host_model, weight_moves, frozen):
    """12 steps: the policy is placed once (its updates stay on the devices), and an
    on-the-fly reference once more."""
    mesh = mesh_or_none("mesh")
    graphdef, state = host_model
    config = training.TrainConfig(learning_rate=1e-3, logp_chunk_size=16)
    batches = tiny_batches(n=24, batch_size=4)  # 6 batches
    if not frozen:
        batches = scoring.with_reference_logps(graphdef, state, batches, config, mesh=mesh)
    weight_moves.clear()
    result = _train(graphdef, state, batches, config, mesh, 2, state if frozen else None)
    assert result.steps == 12
    assert len(weight_moves) == (2 if frozen else 1)


def test_trained_weights_stay_on_the_devices_for_the_next_stage(
    host_model, weight_moves, host_params_seen
):
    """``loop.train`` hands back the parameters where it trained them (the training
    shardings), so sampling from them, the next stage, moves nothing."""
    mesh = mesh_or_none("mesh")
    graphdef, state = host_model
    config = training.TrainConfig(learning_rate=1e-3, logp_chunk_size=16)
    batches = scoring.with_reference_logps(
        graphdef, state, tiny_batches(n=8, batch_size=4), config, mesh=mesh
    )
    result = _train(graphdef, state, batches, config, mesh, epochs=1)
    shardings = jax.tree.leaves(parallel.model_shardings(result.params, mesh))
    leaves = jax.tree.leaves(result.params)
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert all(
        x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, shardings, strict=True)
    )
    weight_moves.clear()
    host_params_seen.clear()
    sample_texts(
        nnx.merge(graphdef, result.params),
        DecodingTokenizer(),
        [f"question {i}?" for i in range(8)],
        SamplingConfig(max_new_tokens=4, n=2),
        seed=0,
        batch_size=4,
        mesh=mesh,
        progress=False,
    )
    assert weight_moves == []
    assert host_params_seen == [0, 0]
