"""Weights in and out: Hugging Face safetensors folders and llama.cpp GGUF files."""

from jaxalign.weights.export import export_hf, export_merged_hf
from jaxalign.weights.gguf import config_from_gguf, load_gguf, unpermute_rotary_rows
from jaxalign.weights.hf import load_hf, read_hf_config
from jaxalign.weights.layout import WeightsError, hf_tensor_names

__all__ = [
    "WeightsError",
    "config_from_gguf",
    "export_hf",
    "export_merged_hf",
    "hf_tensor_names",
    "load_gguf",
    "load_hf",
    "read_hf_config",
    "unpermute_rotary_rows",
]
