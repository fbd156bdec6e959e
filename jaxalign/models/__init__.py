"""Model definitions: the Llama-family decoder and its configuration, LoRA adapters, the
reward model. Nothing here reads files: weights come in through :mod:`jaxalign.weights`,
models by name through :mod:`jaxalign.loading`."""

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
    # `jaxalign.models.load` is `jaxalign.loading.load`, kept here for users. The loader sits
    # above the model definitions (it reads weights into them), so it is resolved on first
    # use, never imported by this package itself.
    if name == "load":
        from jaxalign.loading import load

        return load
    raise AttributeError(f"module 'jaxalign.models' has no attribute {name!r}")


__all__ += ["load"]
