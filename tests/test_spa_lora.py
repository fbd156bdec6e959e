"""SPA with LoRA (``spa.lora_rank``): the loaded model stays frozen and is π_init; each round
trains adapters that continue the previous round's, against π_{i-1} = base ⊕ those; a run
resumes to the same adapters, and exports the merged model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from small_spa import small_spa_overrides, write_small_demo_data

from jaxalign import checkpoint
from jaxalign.algorithms import spa
from jaxalign.config import load_config
from jaxalign.loading import load
from jaxalign.models import lora

RANK, ALPHA = 4, 8.0
TOKENS = jnp.asarray([[1, 20, 300, 4000, 5, 77, 9, 12000]], jnp.int32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("spa_lora_data")
    return write_small_demo_data(root)


def _config(data, model_dir, out):
    overrides = small_spa_overrides(
        model_dir, data / "seed.jsonl", data / "prompts.jsonl", data / "eval.jsonl", out
    )
    return load_config(
        None, [*overrides, f"spa.lora_rank={RANK}", f"spa.lora_alpha={ALPHA}", "eval.enabled=false"]
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data, tiny_model_dir):
    out = tmp_path_factory.mktemp("spa_lora") / "spa"
    spa.run(_config(data, tiny_model_dir, out), log=lambda m: None)
    return out


def _adapters(out, round_index, base):
    like = nnx.state(lora.LoraAdapters(base, rank=RANK, rngs=nnx.Rngs(0)))
    return checkpoint.load_params(out / f"round_{round_index}" / "lora", like)


def _b_matrices(adapters):
    return [np.asarray(adapters[name]["b"].get_value()) for name in lora.ALL_LINEAR]


def test_rounds_train_adapters_that_continue_each_other(lora_run, tiny_model_dir):
    state = json.loads((lora_run / "state.json").read_text())["stages"]
    for i in (0, 1):
        result = state[f"round_{i}/train"]["result"]
        assert result["lora"] == str(lora_run / f"round_{i}" / "lora") and "model" not in result
        assert not (lora_run / f"round_{i}" / "model").exists()
    base, _ = load(tiny_model_dir)
    b0, b1 = _b_matrices(_adapters(lora_run, 0, base)), _b_matrices(_adapters(lora_run, 1, base))
    assert all(np.abs(b).max() > 0 for b in b0)  # round 0 moved off B = 0
    assert all(not np.array_equal(x, y) for x, y in zip(b0, b1, strict=True))  # round 1 trained


def test_round_1_starts_at_its_reference_the_previous_rounds_adapters(lora_run):
    """π_{i-1} = base ⊕ round 0's adapters is both round 1's start and its on-the-fly
    reference, so the first step's margin is 0 (with π_init as the reference it is not:
    round 0's adapters moved the model)."""
    rows = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    first = {tag: next(r for r in rows if r.get("tag") == tag) for tag in ("round_1/train",)}
    assert abs(first["round_1/train"]["rewards/margin"]) < 1e-5
    assert abs(first["round_1/train"]["train/loss"] - np.log(2)) < 1e-4


def test_export_is_the_frozen_base_with_the_last_adapters_merged(lora_run, tiny_model_dir):
    base, _ = load(tiny_model_dir)
    adapters = _adapters(lora_run, 1, base)
    graphdef, base_params = nnx.split(base)
    by_hand = nnx.merge(graphdef, lora.apply_lora(base_params, adapters, ALPHA / RANK))
    exported, _ = load(lora_run / "round_1" / "model_hf")
    from_run, _ = load(lora_run)  # the run's last round, rebuilt from base + adapters
    want = np.asarray(by_hand(TOKENS)[0])
    np.testing.assert_allclose(np.asarray(exported(TOKENS)[0]), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(from_run(TOKENS)[0]), want, atol=1e-5, rtol=0)
    # What LoRA does not adapt is the base's, bit for bit.
    np.testing.assert_array_equal(
        np.asarray(nnx.state(exported)["embed_tokens"].get_value()),
        np.asarray(base_params["embed_tokens"].get_value()),
    )
    card = (lora_run / "round_1" / "model_hf" / "README.md").read_text()
    assert f"LoRA adapters (r = {RANK}, α = {ALPHA})" in card


def test_a_killed_lora_run_resumes_to_the_same_adapters(
    lora_run, data, tiny_model_dir, tmp_path, monkeypatch
):
    """Killed right after round 0's training: the rerun loads round 0's adapters and ends
    with round 1's pairs and adapters equal to the uninterrupted run's."""
    out = tmp_path / "spa"
    original = spa.train_stage

    def crashing(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill")

    with monkeypatch.context() as m:
        m.setattr(spa, "train_stage", crashing)
        with pytest.raises(KeyboardInterrupt):
            spa.run(_config(data, tiny_model_dir, out), log=lambda msg: None)
    assert (out / "round_0" / "lora").is_dir()
    spa.run(_config(data, tiny_model_dir, out), log=lambda msg: None)
    pairs = "round_1/pairs.jsonl"
    assert (out / pairs).read_text() == (lora_run / pairs).read_text()
    base, _ = load(tiny_model_dir)
    for x, y in zip(
        jax.tree.leaves(_adapters(out, 1, base)),
        jax.tree.leaves(_adapters(lora_run, 1, base)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_with_reference_policy_seed_round_2_is_anchored_at_round_0s_adapters(
    data, tiny_model_dir, tmp_path, monkeypatch
):
    """``spa.reference_policy=seed``: round 2 continues round 1's adapters, but its on-the-fly
    reference is base ⊕ round 0's adapters (π_0), so its first margin is not 0, where
    round 1's (π_0 is π_{i-1}) is."""
    from jaxalign.algorithms import stages

    out = tmp_path / "spa"
    config = load_config(
        None,
        [
            *small_spa_overrides(
                tiny_model_dir,
                data / "seed.jsonl",
                data / "prompts.jsonl",
                data / "eval.jsonl",
                out,
            ),
            f"spa.lora_rank={RANK}",
            f"spa.lora_alpha={ALPHA}",
            "eval.enabled=false",
            "spa.rounds=2",
            "spa.prompts_per_round=[4]",
            "spa.reference_policy=seed",
        ],
    )
    references = []
    original = stages.lora_training

    def spy(*args, reference=None, **kwargs):
        references.append(reference)
        return original(*args, reference=reference, **kwargs)

    monkeypatch.setattr(stages, "lora_training", spy)
    spa.run(config, log=lambda m: None)
    assert len(references) == 3 and references[0] is None  # round 0: precomputed, no reference
    base, _ = load(tiny_model_dir)
    round_0 = _adapters(out, 0, base)
    for handed in references[1:]:  # rounds 1 and 2: π_0's adapters
        for x, y in zip(jax.tree.leaves(handed), jax.tree.leaves(round_0), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = {
        t: next(r for r in rows if r.get("tag") == t) for t in ("round_1/train", "round_2/train")
    }
    assert abs(first["round_1/train"]["rewards/margin"]) < 1e-5
    assert abs(first["round_2/train"]["rewards/margin"]) > 1e-5
