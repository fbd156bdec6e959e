"""Import a llama.cpp GGUF file: metadata -> ``ModelConfig``, tensors -> ``Transformer``.

Every tensor is dequantised with ``gguf.quants.dequantize`` (all types the ``gguf``
package implements), renamed to its Hugging Face name and passed through the same
layout table as a safetensors import. Two GGUF conventions are undone here:

* GGUF lists dimensions fastest-first; ``GGUFReader`` already returns numpy arrays
  in C order, so a linear layer arrives as HF's ``[out, in]``.
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` per head from
  HF's half-split rotary layout to interleaved pairs
  (``w.reshape(n, 2, Dh/2, D).swapaxes(1, 2)``); ``unpermute_rotary_rows`` inverts it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.models.llama import ModelConfig, RopeScaling, Transformer
from jaxalign.weights.layout import WeightsError, model_from_params, params_from_hf

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SUPPORTED = ("llama", "qwen2")


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a GGUF tensor name (``None`` for tensors we do not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation; ``w [num_heads*Dh, D]``.

    llama.cpp stores row ``h*Dh + 2j + s`` what HF has at row ``h*Dh + s*Dh/2 + j``;
    this maps it back: ``reshape(n, Dh/2, 2, ...) -> swap -> reshape``.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` for ``path``, or ``WeightsError`` for a missing/corrupt file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad files
        raise WeightsError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is corrupt or "
            "truncated, download it again"
        ) from None


def metadata(reader, key: str, default: Any = None) -> Any:
    """One GGUF metadata value (scalars unwrapped, arrays as lists)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader, path: str | Path = "<gguf>", **overrides) -> ModelConfig:
    """``ModelConfig`` from GGUF metadata (``{arch}.*`` keys, tokenizer for the vocab)."""
    arch = metadata(reader, "general.architecture")
    if arch not in _SUPPORTED:
        raise WeightsError(
            f"{path}: general.architecture is {arch!r}; jaxalign imports {list(_SUPPORTED)} "
            "GGUF files (Llama 2/3, Mistral, SmolLM2, Qwen2)"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise WeightsError(
            f"{path}: carries per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) "
            "that jaxalign reads only from a Hugging Face config.json; load the HF folder instead"
        )

    def need(key: str):
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise WeightsError(f"{path}: metadata field {arch}.{key} is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(metadata(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = metadata(reader, f"{arch}.attention.key_length") or metadata(
        reader, f"{arch}.rope.dimension_count"
    )
    vocab = metadata(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise WeightsError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    scaling = None
    kind = metadata(reader, f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(need("rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise WeightsError(f"{path}: unsupported {arch}.rope.scaling.type {kind!r}")
    fields = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
        rope_theta=float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        attention_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors),
        max_position_embeddings=int(metadata(reader, f"{arch}.context_length", 8192)),
        architecture=arch,
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise WeightsError(f"{path}: metadata gives an invalid model shape: {e}") from None


def load_gguf(
    path: str | Path, *, param_dtype: str = "float32", dtype: str = "float32"
) -> tuple[Transformer, ModelConfig]:
    """Loads a Llama-architecture GGUF file (any quantisation ``gguf`` can dequantise).

    Returns the model and its config. Raises ``WeightsError`` for a missing,
    truncated or unsupported file, naming the file and tensor.
    """
    import gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path, param_dtype=param_dtype, dtype=dtype)
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is not None:
            tensors[name] = tensor

    def get_tensor(name: str) -> np.ndarray:
        tensor = tensors[name]  # KeyError: missing tensor, reported by params_from_hf
        try:
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise WeightsError(
                f"{path}: tensor {tensor.name!r} has quantisation type "
                f"{tensor.tensor_type.name}, which the gguf package cannot dequantise; "
                "convert the file to another type (e.g. Q8_0) with llama.cpp"
            ) from None
        except (ValueError, IndexError) as e:
            raise WeightsError(f"{path}: tensor {tensor.name!r} is corrupt ({e})") from None
        w = np.asarray(w, np.float32)
        if cfg.architecture == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_rotary_rows(w, cfg.num_heads)
        elif cfg.architecture == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_rotary_rows(w, cfg.num_kv_heads)
        return w

    params = params_from_hf(cfg, get_tensor, str(path))
    return model_from_params(cfg, params), cfg
