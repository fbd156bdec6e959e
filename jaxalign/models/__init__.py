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


def __getattr__(name: str):
    # `load` imports jaxalign.weights, which imports this package: resolve it lazily.
    if name == "load":
        from jaxalign.models.registry import load

        return load
    raise AttributeError(f"module 'jaxalign.models' has no attribute {name!r}")


__all__ += ["load"]
