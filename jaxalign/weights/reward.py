"""Import a Hugging Face Llama-family sequence-classification folder as a ``RewardModel``.

The folder holds ``config.json`` and safetensors with ``model.*`` and ``score.weight``,
e.g. one saved by ``LlamaForSequenceClassification.save_pretrained``. The backbone is
built with ``tie_embeddings=True`` so that no ``lm_head`` is needed: the classifier
has none, and its logits are never computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxalign.models.reward import RewardModel
from jaxalign.weights.hf import read_hf_config
from jaxalign.weights.layout import WeightsError, model_from_params, params_from_hf


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"{folder}: no safetensors files; save the reward model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    out = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            out.update({name: file for name in f.keys()})
    return out


def load_reward_model(
    path: str | Path, *, param_dtype: str = "float32", dtype: str = "float32"
) -> RewardModel:
    """Loads a Hugging Face Llama-family sequence-classification folder (1 label)."""
    folder = Path(path)
    cfg = read_hf_config(folder, param_dtype=param_dtype, dtype=dtype, tie_embeddings=True)
    hf = json.loads((folder / "config.json").read_text())
    labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 1
    if labels != 1:
        raise WeightsError(
            f"{folder}/config.json: a reward model has one output, this one has {labels} labels"
        )
    files = _tensor_files(folder)

    def get_tensor(name: str) -> np.ndarray:
        with safe_open(str(files[name]), framework="numpy") as f:
            return f.get_tensor(name)

    if "score.weight" not in files:
        raise WeightsError(
            f"{folder}: no 'score.weight' tensor; is this a sequence-classification "
            "(reward) model rather than a causal LM?"
        )
    score = get_tensor("score.weight")
    if score.shape != (1, cfg.hidden_size):
        raise WeightsError(
            f"{folder}: score.weight has shape {score.shape}, expected (1, {cfg.hidden_size})"
        )
    backbone = model_from_params(cfg, params_from_hf(cfg, get_tensor, str(folder)))
    param = np.dtype("float32") if param_dtype == "float32" else jnp.dtype(param_dtype)
    return RewardModel(backbone, score.T.astype(param))
