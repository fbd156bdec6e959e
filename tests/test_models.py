"""Logits parity of the decoder against transformers' torch models.

Small random Llama (with Llama-3 RoPE scaling), Mistral and Qwen2 (q/k/v biases)
models are saved with ``save_pretrained`` and loaded through ``load_hf``; logits on a
left-padded batch must match torch's on every real token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign.models import init_cache, positions_from_mask
from jaxalign.models.llama import ModelConfig, Transformer, causal_block_bounds
from jaxalign.weights import load_hf

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

CASES = {
    "llama3_rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=None),
    ),
    "qwen2_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "llama_tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(tie_word_embeddings=True),
    ),
}

TOKENS = np.array(
    [
        [5, 17, 99, 3, 42, 8, 77, 12, 9, 31],
        [0, 0, 0, 64, 2, 120, 7, 7, 55, 1],
        [0, 0, 0, 0, 0, 0, 0, 11, 23, 101],
    ],
    np.int32,
)
MASK = (np.arange(10)[None, :] >= np.array([[0], [3], [7]])).astype(np.int32)


def save_random_model(kind: str, folder) -> torch.nn.Module:
    config_cls, model_cls, extra = CASES[kind]
    torch.manual_seed(0)
    config = config_cls(**SMALL, **extra)
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases: HF initialises them to zero
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def torch_logits(model, tokens, mask) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_random_model(request.param, folder)
    return request.param, reference, load_hf(folder), folder


def test_logits_match_transformers_on_left_padded_batch(pair):
    kind, reference, model, _ = pair
    expected = torch_logits(reference, TOKENS, MASK)
    logits, _ = model(jnp.asarray(TOKENS), attention_mask=jnp.asarray(MASK))
    real = MASK.astype(bool)
    err = np.abs(np.asarray(logits)[real] - expected[real]).max()
    scale = np.abs(expected[real]).max()
    assert err <= 1e-4 * max(scale, 1.0), (kind, err, scale)


def test_config_details_survive_import(pair):
    kind, reference, model, _ = pair
    cfg = model.config
    assert cfg.attention_bias == (kind == "qwen2_bias")
    assert cfg.tie_embeddings == (kind == "llama_tied")
    assert hasattr(model, "lm_head") != cfg.tie_embeddings
    if kind == "llama3_rope":
        assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3"


def test_cached_incremental_logits_equal_full_forward(pair):
    kind, reference, model, _ = pair
    expected = torch_logits(reference, TOKENS, MASK)
    cache = init_cache(model.config, TOKENS.shape[0], 16)
    mask = jnp.asarray(MASK)
    positions = positions_from_mask(mask)
    prefill = 6
    logits, cache = model(
        jnp.asarray(TOKENS[:, :prefill]), positions[:, :prefill], mask[:, :prefill], cache
    )
    steps = [np.asarray(logits)]
    for t in range(prefill, TOKENS.shape[1]):
        logits, cache = model(
            jnp.asarray(TOKENS[:, t : t + 1]), positions[:, t : t + 1], mask[:, t : t + 1], cache
        )
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    real = MASK.astype(bool)
    err = np.abs(incremental[real] - expected[real]).max()
    assert err <= 1e-4 * max(np.abs(expected[real]).max(), 1.0), (kind, err)


def test_bfloat16_compute_is_finite_and_close(tmp_path):
    reference = save_random_model("llama3_rope", tmp_path)
    expected = torch_logits(reference, TOKENS, MASK)
    model = load_hf(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    logits, _ = model(jnp.asarray(TOKENS), attention_mask=jnp.asarray(MASK))
    logits = np.asarray(logits)
    real = MASK.astype(bool)
    assert logits.dtype == np.float32 and np.isfinite(logits[real]).all()
    err = np.abs(logits[real] - expected[real]).max()
    assert err <= 0.05 * np.abs(expected[real]).max() + 0.05, err


def long_padded_batch(length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``length`` tokens: one full, one right-padded, one left-padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, SMALL["vocab_size"], (3, length)).astype(np.int32)
    mask = np.ones((3, length), np.int32)
    mask[1, length - 70 :] = 0
    mask[2, : length // 2 + 5] = 0
    return np.where(mask == 1, tokens, 0), mask


def test_blocked_causal_attention_matches_transformers(pair):
    """200 tokens: the queries run in 3 blocks (``causal_block_bounds``), each seeing only
    the keys up to its end; logits on every real token equal torch's full attention."""
    kind, reference, model, _ = pair
    assert model.config.causal_blocks >= 3
    assert causal_block_bounds(200, model.config.causal_blocks) == [0, 66, 133, 200]
    tokens, mask = long_padded_batch(200)
    expected = torch_logits(reference, tokens, mask)
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits)[real] - expected[real]).max()
    assert err <= 1e-4 * max(np.abs(expected[real]).max(), 1.0), (kind, err)


def test_causal_block_bounds():
    assert causal_block_bounds(256, 4) == [0, 64, 128, 192, 256]
    assert causal_block_bounds(256, 1) == [0, 256]
    assert causal_block_bounds(127, 4) == [0, 127]  # no block under 64 queries
    assert causal_block_bounds(128, 4) == [0, 64, 128]
    assert causal_block_bounds(1000, 3) == [0, 333, 666, 1000]
    assert causal_block_bounds(5, 4) == [0, 5]
    with pytest.raises(ValueError, match="causal_blocks"):
        ModelConfig(causal_blocks=0)


def test_blocked_attention_gradients_equal_one_block():
    """Loss and parameter gradients with 4 query blocks equal the whole score matrix's."""
    config = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, tie_embeddings=True,
    )  # fmt: skip
    tokens, mask = long_padded_batch(256, seed=1)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(3, 256, 64)), jnp.float32)

    def loss(model):
        hidden, _ = model.hidden_states(
            jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask)
        )
        return jnp.sum(hidden * weights * jnp.asarray(mask)[..., None])

    results = []
    for blocks in (4, 1):
        model = Transformer(config.replace(causal_blocks=blocks), rngs=nnx.Rngs(0))
        value, grads = nnx.value_and_grad(loss)(model)
        results.append((float(value), jax.tree.leaves(nnx.state(grads))))
    (blocked, blocked_grads), (whole, whole_grads) = results
    np.testing.assert_allclose(blocked, whole, rtol=1e-5)
    for a, b in zip(blocked_grads, whole_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
