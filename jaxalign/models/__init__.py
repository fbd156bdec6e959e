"""Model definitions: the Llama-family decoder and its configuration."""

from jaxalign.models.llama import (
    KVCache,
    ModelConfig,
    RopeScaling,
    Transformer,
    abstract_model,
    init_cache,
    positions_from_mask,
)

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "abstract_model",
    "init_cache",
    "positions_from_mask",
]
