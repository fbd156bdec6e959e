"""Import a Hugging Face folder (``config.json`` + safetensors) into a ``Transformer``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxalign.models.llama import ModelConfig, Transformer
from jaxalign.weights.layout import WeightsError, model_from_params, params_from_hf

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(folder: str | Path, **overrides) -> ModelConfig:
    """``ModelConfig`` from ``folder/config.json`` (``overrides`` replace fields)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(
            f"{folder}: no such folder; pass a Hugging Face model folder holding "
            "config.json and model.safetensors"
        )
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a Hugging Face model folder needs config.json")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf_config(hf, **overrides)
    except KeyError as e:
        raise WeightsError(f"{path}: required field {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def _shard_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(
                f"{index}: not a safetensors index (needs 'weight_map'): {e}"
            ) from None
        return {name: folder / file for name, file in weight_map.items()}
    if single.is_file():
        return _names_in(single)
    hint = ""
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        hint = (
            " It holds torch .bin weights: convert them once with transformers "
            "(`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
            "safe_serialization=True)`)."
        )
    raise WeightsError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found.{hint}")


def _open(path: Path):
    if not path.is_file():
        raise WeightsError(f"{path}: safetensors file is missing (named in {INDEX_FILE})")
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(
            f"{path}: cannot read safetensors ({e}); the file is corrupt or truncated, "
            "download or export it again"
        ) from None


def _names_in(path: Path) -> dict[str, Path]:
    with _open(path) as file:
        return {name: path for name in file.keys()}


def load_hf(
    path: str | Path, *, param_dtype: str = "float32", dtype: str = "float32"
) -> Transformer:
    """Loads a Hugging Face Llama/Mistral/Qwen2 folder into a ``Transformer``.

    Reads ``config.json`` and ``model.safetensors`` (or the shards named by
    ``model.safetensors.index.json``). The model is created abstractly and filled
    with the file's arrays, cast to ``param_dtype``; ``dtype`` is the compute dtype.
    Raises ``WeightsError`` naming the file and tensor for anything unreadable.
    """
    folder = Path(path)
    cfg = read_hf_config(folder, param_dtype=param_dtype, dtype=dtype)
    shards = _shard_map(folder)
    handles: dict[Path, object] = {}

    def get_tensor(name: str) -> np.ndarray:
        file = shards[name]  # KeyError: missing tensor, reported by params_from_hf
        if file not in handles:
            handles[file] = _open(file)
        try:
            return handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(
                f"{file}: cannot read tensor {name!r} ({e}); file is corrupt"
            ) from None

    source = str(folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else SINGLE_FILE))
    params = params_from_hf(cfg, get_tensor, source)
    handles.clear()
    return model_from_params(cfg, params)
