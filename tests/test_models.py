"""Logits parity of the decoder against transformers' torch models.

Small random Llama (with Llama-3 RoPE scaling), Mistral and Qwen2 (q/k/v biases)
models are saved with ``save_pretrained`` and loaded through ``load_hf``; logits on a
left-padded batch must match torch's on every real token.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxalign.models import init_cache, positions_from_mask
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
