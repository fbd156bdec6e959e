"""Export a ``Transformer`` (or one with LoRA adapters merged in) as a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxalign.models.llama import Transformer
from jaxalign.models.lora import LoraAdapters, merged_model
from jaxalign.weights.layout import hf_tensors_from_model

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
MODEL_CARD = "README.md"


def export_hf(
    model: Transformer,
    path: str | Path,
    tokenizer=None,
    *,
    dtype: str | None = None,
    model_card: str | None = None,
) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` (+ tokenizer files,
    ``generation_config.json`` and a ``README.md`` model card) to ``path``.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` then builds the same
    network (Llama/Mistral/Qwen2 class from ``config.architecture``). Tensors keep the
    model's parameter dtype, or are cast to ``dtype`` (float32 | bfloat16 | float16).
    ``tokenizer`` is anything with ``save_pretrained(path)`` (``jaxalign.tokenizer.Tokenizer``
    or a transformers tokenizer); with it, ``generation_config.json`` lists every id that
    ends a turn (``eos_token_ids``), so ``generate`` and vLLM stop where jaxalign's sampler
    does. ``model_card``: the text of ``README.md``. Returns ``path``.
    """
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(hf_tensors_from_model(model))
    if dtype is not None:
        tensors = {k: v.astype(EXPORT_DTYPES[dtype]) for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = model.config.to_hf_config()
    if dtype is not None:
        hf_config["torch_dtype"] = dtype
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        generation = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                hf_config[key] = value
                generation[key] = value
        stops = list(getattr(tokenizer, "eos_token_ids", ()) or ())
        if len(stops) > 1:
            generation["eos_token_id"] = stops
        if generation:
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if model_card is not None:
        (folder / MODEL_CARD).write_text(model_card, encoding="utf-8")
    return folder


def export_merged_hf(
    model: Transformer,
    adapters: LoraAdapters,
    scaling: float,
    path: str | Path,
    tokenizer=None,
    **kwargs,
) -> Path:
    """Merges LoRA ``adapters`` into the base kernels (``W + s·A@B``,
    :func:`jaxalign.models.lora.merged_model`) and writes a Hugging Face folder.

    The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained``
    (and :func:`jaxalign.weights.load_hf`) as an ordinary model; returns its path.
    """
    merged = jax.device_get(merged_model(model, adapters, scaling))
    return export_hf(merged, path, tokenizer)
