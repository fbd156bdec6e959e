"""``jaxalign dpo`` with LoRA (``dpo.lora_rank``): adapters train on the frozen loaded model,
which is also the reference; the run keeps them in ``lora/`` and exports the merged model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from flax import nnx
from small_spa import write_small_demo_data

from jaxalign import checkpoint, cli
from jaxalign.loading import load
from jaxalign.models import lora

RANK, ALPHA = 4, 8.0
TARGETS = ("q_proj", "down_proj")
TOKENS = np.asarray([[1, 20, 300, 4000, 5, 77, 9, 12000]], np.int32)


def _argv(data, model_dir, out):
    argv = ["dpo", "--pairs", str(data / "seed.jsonl"), "--output-dir", str(out)]
    argv += ["--save-every", "0", f"model.name={model_dir}", "train.batch_size=4"]
    argv += ["train.epochs=2", "train.learning_rate=1e-2", "train.logp_chunk_size=32"]
    argv += ["data.max_prompt_tokens=48", "data.max_response_tokens=16", "run.progress=false"]
    argv += ["run.mesh.data=2", "run.mesh.fsdp=2", "run.mesh.tensor=2"]
    argv += [f"dpo.lora_rank={RANK}", f"dpo.lora_alpha={ALPHA}"]
    return argv + [f"dpo.lora_targets={json.dumps(list(TARGETS))}"]


@pytest.fixture(scope="module")
def dpo_lora_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dpo_lora")
    data = write_small_demo_data(root)
    out = root / "dpo"
    assert cli.main(_argv(data, tiny_model_dir, out)) == 0
    return data, out


def _adapters(out, base):
    like = nnx.state(lora.LoraAdapters(base, rank=RANK, targets=TARGETS, rngs=nnx.Rngs(0)))
    return checkpoint.load_params(out / "lora", like)


def _value(x):
    return np.asarray(x.get_value() if hasattr(x, "get_value") else x)


def test_dpo_with_lora_trains_only_adapters_from_the_reference(dpo_lora_run, tiny_model_dir):
    _, out = dpo_lora_run
    assert (out / "lora").is_dir() and not (out / "model").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["dpo"]["lora_rank"] == RANK
    adapters = _adapters(out, load(tiny_model_dir)[0])
    assert set(adapters) == set(TARGETS)
    assert all(np.abs(_value(adapters[name]["b"])).max() > 0 for name in TARGETS)
    # B = 0 at the start and the frozen base is the reference: the first step is log 2.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("tag") == "dpo")
    assert abs(first["rewards/margin"]) < 1e-6
    assert abs(first["train/loss"] - np.log(2)) < 1e-5
    last = [r for r in rows if r.get("tag") == "dpo"][-1]
    assert last["train/loss"] < first["train/loss"]


def test_dpo_lora_export_is_the_base_with_the_adapters_merged_by_hand(dpo_lora_run, tiny_model_dir):
    _, out = dpo_lora_run
    base, _ = load(tiny_model_dir)
    base_params = nnx.state(base)
    adapters = _adapters(out, base)
    exported, _ = load(out / "model_hf")
    from_run, _ = load(out)  # rebuilt from the base and lora/
    exported_params = nnx.state(exported)
    scale = ALPHA / RANK
    # q_proj [L, D, H, Dh]: A [L, D, r], B [L, r, H, Dh]; down_proj [L, F, D]: A [L, F, r].
    for path, spec in ((("self_attn", "q_proj"), "ldr,lrhk->ldhk"), (("mlp", "down_proj"), None)):
        pair = adapters[path[-1]]
        a, b = _value(pair["a"]).astype(np.float64), _value(pair["b"]).astype(np.float64)
        delta = np.einsum(spec, a, b) if spec else np.einsum("lfr,lrd->lfd", a, b)
        w = _value(base_params["layers"][path[0]][path[1]]).astype(np.float64)
        got = _value(exported_params["layers"][path[0]][path[1]])
        np.testing.assert_allclose(got, w + scale * delta, atol=1e-6, rtol=0)
    for kernel in ("k_proj", "v_proj", "o_proj"):  # not targeted: the base's, bit for bit
        np.testing.assert_array_equal(
            _value(exported_params["layers"]["self_attn"][kernel]),
            _value(base_params["layers"]["self_attn"][kernel]),
        )
    np.testing.assert_array_equal(
        _value(exported_params["embed_tokens"]), _value(base_params["embed_tokens"])
    )
    want = np.asarray(exported(TOKENS)[0])
    np.testing.assert_allclose(np.asarray(from_run(TOKENS)[0]), want, atol=1e-5, rtol=0)
    assert np.abs(want - np.asarray(base(TOKENS)[0])).max() > 1e-4
    card = (out / "model_hf" / "README.md").read_text()
    assert f"LoRA adapters (r = {RANK}, α = {ALPHA})" in card


def test_dpo_lora_rerun_resumes_and_changes_nothing(dpo_lora_run, tiny_model_dir, tmp_path):
    """A rerun of the finished command restores its last checkpoint: same adapters."""
    data, out = dpo_lora_run
    before = [np.asarray(x) for x in _leaves(_adapters(out, load(tiny_model_dir)[0]))]
    assert cli.main(_argv(data, tiny_model_dir, out)) == 0
    after = [np.asarray(x) for x in _leaves(_adapters(out, load(tiny_model_dir)[0]))]
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="keeps its model in"):
        load(out / "model")


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
