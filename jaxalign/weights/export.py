"""Export a ``Transformer`` (or one with LoRA adapters merged in) as a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from safetensors.numpy import save_file

from jaxalign.models.llama import Transformer
from jaxalign.models.lora import LoraAdapters, merged_model
from jaxalign.weights.layout import hf_tensors_from_model


def export_hf(model: Transformer, path: str | Path, tokenizer=None) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` (+ tokenizer files) to ``path``.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` then builds the same
    network (Llama/Mistral/Qwen2 class from ``config.architecture``). Tensors keep the
    model's parameter dtype. ``tokenizer`` is anything with ``save_pretrained(path)``
    (``jaxalign.tokenizer.Tokenizer`` or a transformers tokenizer). Returns ``path``.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(hf_tensors_from_model(model))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = model.config.to_hf_config()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                hf_config[key] = value
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return folder


def export_merged_hf(
    model: Transformer, adapters: LoraAdapters, scaling: float, path: str | Path, tokenizer=None
) -> Path:
    """Merges LoRA ``adapters`` into the base kernels (``W + s·A@B``,
    :func:`jaxalign.models.lora.merged_model`) and writes a Hugging Face folder.

    The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained``
    (and :func:`jaxalign.weights.load_hf`) as an ordinary model; returns its path.
    """
    merged = jax.device_get(merged_model(model, adapters, scaling))
    return export_hf(merged, path, tokenizer)
