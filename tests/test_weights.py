"""Weights import/export against transformers, and clear errors for bad input."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxalign.loading import EMBEDDED, installed_gguf
from jaxalign.models import ModelConfig, Transformer
from jaxalign.weights import WeightsError, export_hf, load_gguf, load_hf, unpermute_rotary_rows

SMOLLM2 = EMBEDDED["smollm2-135m-instruct"]
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Café, naïve, 東京, 🙂 — unicode text",
]


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory) -> Path:
    path = installed_gguf(SMOLLM2)
    if path is None:
        pytest.skip(f"needs the embedded model package: {SMOLLM2.install_command}")
    folder = tmp_path_factory.mktemp("gguf")
    (folder / path.name).symlink_to(path)
    return folder / path.name


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    ours, config = load_gguf(smollm2_gguf)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )
    return ours, config, theirs, tokenizer


def left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return tokens, mask


def torch_logits(model, tokens, mask) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


# -- GGUF ---------------------------------------------------------------------------------


def test_gguf_config_is_smollm2(smollm2_pair):
    _, config, _, _ = smollm2_pair
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_embeddings and config.rope_theta == 100000.0


def test_gguf_logits_match_transformers(smollm2_pair):
    ours, _, theirs, tokenizer = smollm2_pair
    tokens, mask = left_padded([tokenizer.encode(p) for p in PROMPTS])
    expected = torch_logits(theirs, tokens, mask)
    logits, _ = ours(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits)[real] - expected[real]).max()
    print(f"SmolLM2-135M GGUF vs transformers: max abs logit diff {err:.2e}")
    assert err <= 1e-3


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (the forward direction)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = np.random.default_rng(0).normal(size=(n_head * 8, 5))
    np.testing.assert_array_equal(unpermute_rotary_rows(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)


# -- HF export ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(architecture="llama"),
        dict(architecture="llama", tie_embeddings=True),
        dict(architecture="qwen2", attention_bias=True),
    ],
    ids=["llama", "tied", "qwen2"],
)
def test_export_reloads_in_transformers_with_same_logits(tmp_path, fields):
    config = ModelConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
        initializer_range=0.2,
        **fields,
    )
    model = Transformer(config, rngs=nnx.Rngs(1))
    export_hf(model, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokens, mask = left_padded([[3, 9, 27, 81, 5], [44, 2]])
    expected = torch_logits(theirs.eval(), tokens, mask)
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits)[real] - expected[real]).max()
    assert err <= 1e-4 * max(np.abs(expected).max(), 1.0), err
    assert theirs.config.tie_word_embeddings == config.tie_embeddings
    reloaded = load_hf(tmp_path)
    assert reloaded.config.dim_per_head == config.dim_per_head
    assert reloaded.config.replace(initializer_range=0.2, head_dim=None) == config


# -- bad input ----------------------------------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    config = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
    )
    export_hf(Transformer(config, rngs=nnx.Rngs(0)), tmp_path / "model")
    return tmp_path / "model"


def edit_config(folder: Path, **changes) -> None:
    hf = json.loads((folder / "config.json").read_text())
    hf.update(changes)
    (folder / "config.json").write_text(json.dumps(hf))


def test_missing_folder_and_files(tmp_path, hf_folder):
    with pytest.raises(WeightsError, match="no such folder"):
        load_hf(tmp_path / "nowhere")
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="neither model.safetensors"):
        load_hf(hf_folder)
    (hf_folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        load_hf(hf_folder)


def test_corrupt_safetensors(hf_folder):
    path = hf_folder / "model.safetensors"
    path.write_bytes(b"\x07" * 64 + path.read_bytes()[64:])
    with pytest.raises(WeightsError, match="model.safetensors.*corrupt"):
        load_hf(hf_folder)


def test_unknown_model_type(hf_folder):
    edit_config(hf_folder, model_type="gpt2")
    with pytest.raises(WeightsError, match="config.json.*'gpt2'"):
        load_hf(hf_folder)


def test_shape_mismatch_names_tensor_shapes_and_file(hf_folder):
    edit_config(hf_folder, intermediate_size=40)
    with pytest.raises(WeightsError) as info:
        load_hf(hf_folder)
    message = str(info.value)
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "(24, 16)" in message and "(40, 16)" in message and "model.safetensors" in message


def test_missing_tensor(hf_folder):
    tensors = load_file(hf_folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, hf_folder / "model.safetensors")
    with pytest.raises(WeightsError, match="'model.layers.1.self_attn.v_proj.weight' is missing"):
        load_hf(hf_folder)


def test_sharded_index_with_missing_shard(hf_folder):
    shutil.move(hf_folder / "model.safetensors", hf_folder / "model-00001-of-00001.safetensors")
    names = load_file(hf_folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_hf(hf_folder).config.num_layers == 2
    (hf_folder / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00001-of-00001.safetensors.*missing"):
        load_hf(hf_folder)


@pytest.mark.parametrize("size", [1000, 1_000_000, 50_000_000])
def test_truncated_gguf(tmp_path, smollm2_gguf, size):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(WeightsError, match="truncated.gguf.*corrupt or truncated"):
        load_gguf(path)


def test_missing_gguf(tmp_path):
    with pytest.raises(WeightsError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def write_gguf_like_llama_cpp(model: torch.nn.Module, path: Path, arch: str) -> None:
    """Writes a float32 GGUF the way llama.cpp's convert_hf_to_gguf.py does for ``arch``:
    its tensor names, q/k rows permuted for ``llama`` (not for ``qwen2``)."""
    import gguf

    cfg = model.config
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(h)
    writer.add_head_count_kv(k)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if name in top:
            writer.add_tensor(top[name], w)
            continue
        _, _, i, rest = name.split(".", 3)
        if arch == "llama" and rest == "self_attn.q_proj.weight":
            w = llama_cpp_permute(w, h)
        elif arch == "llama" and rest == "self_attn.k_proj.weight":
            w = llama_cpp_permute(w, k)
        writer.add_tensor(f"blk.{i}.{names[rest]}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_written_by_llama_cpp_conventions_matches_torch(tmp_path, arch):
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
    )
    reference = model_cls(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    write_gguf_like_llama_cpp(reference, tmp_path / "tiny.gguf", arch)
    model, imported = load_gguf(tmp_path / "tiny.gguf")
    assert imported.attention_bias == (arch == "qwen2") and not imported.tie_embeddings
    tokens, mask = left_padded([[3, 9, 27, 61, 5, 8, 13], [44, 2, 7]])
    expected = torch_logits(reference, tokens, mask)
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits)[real] - expected[real]).max()
    assert err <= 1e-4 * max(np.abs(expected).max(), 1.0), err
