"""LoRA adapters: zero start, merged weights vs the adapter form in torch, export, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import training
from jaxalign.models import ModelConfig, Transformer, lora
from jaxalign.parallel import make_mesh, model_shardings

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_embeddings=False,
    max_position_embeddings=64,
)
TOKENS = np.array([[1, 5, 9, 13, 2, 40, 41, 7], [3, 3, 8, 60, 22, 11, 0, 0]], np.int32)


@pytest.fixture(scope="module")
def base():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def _randomised_adapters(model, rank=3, seed=1):
    """Adapters with B drawn at random too (B = 0 would make every test trivial)."""
    adapters = lora.LoraAdapters(model, rank=rank, rngs=nnx.Rngs(seed))
    state = nnx.state(adapters)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100))
    new = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    nnx.update(adapters, new)
    return adapters


def test_shapes_and_scaling(base):
    adapters = lora.LoraAdapters(base, rank=8, rngs=nnx.Rngs(0))
    state = nnx.state(adapters)
    assert state["q_proj"]["a"].shape == (2, 16, 8)
    assert state["q_proj"]["b"].shape == (2, 8, 4, 4)
    assert state["o_proj"]["a"].shape == (2, 4, 4, 8)
    assert state["o_proj"]["b"].shape == (2, 8, 16)
    assert state["down_proj"]["a"].shape == (2, 32, 8)
    assert lora.lora_scaling(8, 16) == 2.0
    for name in lora.ALL_LINEAR:
        assert not np.asarray(state[name]["b"].get_value()).any()  # B starts at zero
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora.LoraAdapters(base, rank=2, targets=("qproj",), rngs=nnx.Rngs(0))


def test_forward_equals_base_when_b_is_zero(base):
    adapters = lora.LoraAdapters(base, rank=4, rngs=nnx.Rngs(2))
    merged = lora.merged_model(base, adapters, lora.lora_scaling(4, 16))
    want, _ = base(jnp.asarray(TOKENS))
    got, _ = merged(jnp.asarray(TOKENS))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merged_forward_equals_adapter_forward_in_torch(base, tmp_path):
    """Export the merged model; compare with the base model in torch plus adapters
    applied in their own form, ``y = x W^T + s·(x A) B``, by forward hooks."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxalign.weights import export_hf, export_merged_hf

    scaling = 2.0
    adapters = _randomised_adapters(base)
    base_dir = export_hf(base, tmp_path / "base")
    merged_dir = export_merged_hf(base, adapters, scaling, tmp_path / "merged")

    ref = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    state = nnx.state(adapters)
    hooks = []
    for i, layer in enumerate(ref.model.layers):
        for name in lora.ALL_LINEAR:
            module = getattr(
                layer.self_attn
                if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                else layer.mlp,
                name,
            )
            a = np.asarray(state[name]["a"].get_value())[i]
            b = np.asarray(state[name]["b"].get_value())[i]
            a_t = torch.tensor(a.reshape(-1, a.shape[-1]))  # [in, r], in flattened (heads, Dh)
            b_t = torch.tensor(b.reshape(b.shape[0], -1))  # [r, out]

            def hook(mod, inputs, output, a_t=a_t, b_t=b_t):
                return output + scaling * (inputs[0] @ a_t) @ b_t

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        want = ref(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    for h in hooks:
        h.remove()
    merged_ref = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        exported = merged_ref(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    ours, _ = lora.merged_model(base, adapters, scaling)(jnp.asarray(TOKENS))
    base_logits, _ = base(jnp.asarray(TOKENS))
    assert np.abs(np.asarray(base_logits) - want).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4)
    np.testing.assert_allclose(exported, want, atol=1e-4)


def test_training_updates_only_the_adapters(base):
    mesh = make_mesh(2, 2, 2)
    cfg = training.TrainConfig(learning_rate=1e-2, warmup_ratio=0.0, batch_size=4)
    scaling = 2.0
    base_graphdef, base_params = nnx.split(base)
    before = jax.tree.map(np.asarray, base_params)
    adapters = lora.LoraAdapters(base, rank=2, rngs=nnx.Rngs(5))

    def sft_on_policy(policy, batch, algo_state, step, rng, frozen=None):
        return training.sft_loss_fn(cfg)(policy, batch, algo_state, step, rng)

    loss_fn = lora.lora_loss_fn(base_graphdef, sft_on_policy, scaling)
    graphdef, state, shardings = training.create_train_state(adapters, cfg, 3, mesh)
    frozen_shardings = model_shardings(base_params, mesh)
    step = training.make_train_step(
        graphdef, cfg, mesh, loss_fn, shardings, total_steps=3, frozen_shardings=frozen_shardings
    )
    frozen = jax.device_put(base_params, frozen_shardings)
    ids = np.tile(TOKENS, (4, 1))[:8]
    batch = {
        "sft_ids": ids,
        "sft_attention_mask": np.ones_like(ids),
        "sft_loss_mask": np.concatenate([np.zeros((8, 3)), np.ones((8, 5))], 1).astype(np.int32),
        "sft_weight": np.ones(8, np.float32),
    }
    a0 = jax.tree.map(np.asarray, state.params)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, frozen)
    jax.tree.map(np.testing.assert_array_equal, after, before)  # the base never moves
    a1 = jax.tree.map(np.asarray, state.params)
    assert np.abs(a1["q_proj"]["b"] - a0["q_proj"]["b"]).max() > 0
    assert set(a1) == set(lora.ALL_LINEAR)  # only adapters are trained parameters


@pytest.mark.parametrize("remat", [False, True, "dots"])
def test_the_layer_by_layer_merge_is_the_merged_model_with_the_same_gradients(base, remat):
    """The train step's LoRA model (W + s·A@B merged inside the layer scan, one layer at a
    time) computes what the whole merged model computes, and gives the adapters the same
    gradients, under every remat policy."""
    model = training.configure_model(base, training.TrainConfig(remat=remat))
    adapters = _randomised_adapters(base)
    scaling = lora.lora_scaling(3, 16)
    ids = jnp.asarray(TOKENS)
    attention = (ids > 0).astype(jnp.int32).at[:, 0].set(1)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def by_layer(state):
        m = lora.AdaptedTransformer(model, state, scaling)
        h, _ = m.hidden_states(ids, positions, attention)
        return jnp.sum(jnp.tanh(m.logits(h)))

    def whole(state):
        graphdef, params = nnx.split(model)
        m = nnx.merge(graphdef, lora.apply_lora(params, state, scaling))
        h, _ = m.hidden_states(ids, positions, attention)
        return jnp.sum(jnp.tanh(m.logits(h)))

    state = nnx.state(adapters)
    v1, g1 = jax.value_and_grad(by_layer)(state)
    v2, g2 = jax.value_and_grad(whole)(state)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
