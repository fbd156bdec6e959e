"""The one table that maps Hugging Face tensor names onto jaxalign parameters.

Hugging Face (torch) stores linear layers as ``[out, in]`` matrices, one tensor per
layer; jaxalign stores ``[in, out]`` with heads split out, stacked on a leading
``layers`` axis ``L``. Import and export both read this table, so a rename or a
reshape exists in exactly one place:

===================================  ===========================  =====================
HF tensor (per layer ``i``)            HF shape                     jaxalign parameter
===================================  ===========================  =====================
``model.embed_tokens.weight``          ``[V, D]``                   ``embed_tokens [V,D]``
``model.layers.i.input_layernorm``     ``[D]``                      ``[L,D]``
``...self_attn.q_proj.weight``         ``[H*Dh, D]``                ``q_proj [L,D,H,Dh]``
``...self_attn.k_proj/v_proj.weight``  ``[K*Dh, D]``                ``[L,D,K,Dh]``
``...self_attn.o_proj.weight``         ``[D, H*Dh]``                ``o_proj [L,H,Dh,D]``
``...self_attn.q/k/v_proj.bias``       ``[H*Dh]`` / ``[K*Dh]``      ``q_bias [L,H,Dh]``...
``...post_attention_layernorm``        ``[D]``                      ``[L,D]``
``...mlp.gate_proj/up_proj.weight``    ``[F, D]``                   ``[L,D,F]``
``...mlp.down_proj.weight``            ``[D, F]``                   ``[L,F,D]``
``model.norm.weight``                  ``[D]``                      ``norm.weight [D]``
``lm_head.weight``                     ``[V, D]``                   ``lm_head [D,V]``
===================================  ===========================  =====================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxalign.models.llama import ModelConfig, Transformer, abstract_model

ParamPath = tuple[str, ...]


class WeightsError(ValueError):
    """A weights file or folder that cannot be loaded; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one jaxalign parameter relates to its Hugging Face tensor(s).

    ``hf_name`` has a ``{i}`` placeholder for per-layer tensors (stacked on ``L``).
    ``to_ours(w, cfg)`` turns one HF tensor into one layer's parameter slice and
    ``to_hf(p, cfg)`` is its inverse. ``hf_shape(cfg)`` is the HF tensor's shape.
    """

    path: ParamPath
    hf_name: str
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _identity(w, cfg):
    return w


def _transpose(w, cfg):
    return w.T


def _rules(cfg: ModelConfig) -> list[TensorRule]:
    """The rules that apply to ``cfg`` (biases only with ``attention_bias``; no
    ``lm_head`` with tied embeddings)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    layer = "model.layers.{i}."

    def proj_in(n):  # HF [n*Dh, D] -> ours [D, n, Dh]
        return lambda w, c: w.T.reshape(d, n, dh)

    def proj_in_inverse(n):
        return lambda p, c: p.reshape(d, n * dh).T

    rules = [
        TensorRule(
            ("embed_tokens",), "model.embed_tokens.weight", lambda c: (v, d), _identity, _identity
        ),
        TensorRule(
            ("layers", "input_layernorm", "weight"),
            layer + "input_layernorm.weight",
            lambda c: (d,),
            _identity,
            _identity,
        ),
        TensorRule(
            ("layers", "self_attn", "q_proj"),
            layer + "self_attn.q_proj.weight",
            lambda c: (h * dh, d),
            proj_in(h),
            proj_in_inverse(h),
        ),
        TensorRule(
            ("layers", "self_attn", "k_proj"),
            layer + "self_attn.k_proj.weight",
            lambda c: (k * dh, d),
            proj_in(k),
            proj_in_inverse(k),
        ),
        TensorRule(
            ("layers", "self_attn", "v_proj"),
            layer + "self_attn.v_proj.weight",
            lambda c: (k * dh, d),
            proj_in(k),
            proj_in_inverse(k),
        ),
        TensorRule(
            ("layers", "self_attn", "o_proj"),
            layer + "self_attn.o_proj.weight",
            lambda c: (d, h * dh),
            lambda w, c: w.T.reshape(h, dh, d),
            lambda p, c: p.reshape(h * dh, d).T,
        ),
        TensorRule(
            ("layers", "post_attention_layernorm", "weight"),
            layer + "post_attention_layernorm.weight",
            lambda c: (d,),
            _identity,
            _identity,
        ),
        TensorRule(
            ("layers", "mlp", "gate_proj"),
            layer + "mlp.gate_proj.weight",
            lambda c: (f, d),
            _transpose,
            _transpose,
        ),
        TensorRule(
            ("layers", "mlp", "up_proj"),
            layer + "mlp.up_proj.weight",
            lambda c: (f, d),
            _transpose,
            _transpose,
        ),
        TensorRule(
            ("layers", "mlp", "down_proj"),
            layer + "mlp.down_proj.weight",
            lambda c: (d, f),
            _transpose,
            _transpose,
        ),
        TensorRule(("norm", "weight"), "model.norm.weight", lambda c: (d,), _identity, _identity),
    ]
    if cfg.attention_bias:
        for name, n in (("q", h), ("k", k), ("v", k)):
            rules.append(
                TensorRule(
                    ("layers", "self_attn", f"{name}_bias"),
                    layer + f"self_attn.{name}_proj.bias",
                    lambda c, n=n: (n * dh,),
                    lambda w, c, n=n: w.reshape(n, dh),
                    lambda p, c, n=n: p.reshape(n * dh),
                )
            )
    if not cfg.tie_embeddings:
        rules.append(
            TensorRule(("lm_head",), "lm_head.weight", lambda c: (v, d), _transpose, _transpose)
        )
    return rules


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name a model of ``cfg`` has, in table order."""
    names = []
    for rule in _rules(cfg):
        if rule.per_layer:
            names += [rule.hf_name.format(i=i) for i in range(cfg.num_layers)]
        else:
            names.append(rule.hf_name)
    return names


def params_from_hf(
    cfg: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    source: str,
) -> dict[ParamPath, np.ndarray]:
    """Reads every parameter of ``cfg`` through ``get_tensor(hf_name)``.

    ``get_tensor`` raises ``KeyError`` for a missing tensor. Arrays come back in
    ``cfg.param_dtype`` (numpy, ``ml_dtypes.bfloat16`` for bfloat16), per-layer
    tensors stacked on a leading ``L`` axis. ``source`` names the file(s) in errors.
    """
    dtype = (
        np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
    )

    def read(name: str, rule: TensorRule) -> np.ndarray:
        try:
            w = get_tensor(name)
        except KeyError:
            raise WeightsError(
                f"{source}: tensor {name!r} is missing; the config "
                f"({cfg.architecture}, {cfg.num_layers} layers, attention_bias="
                f"{cfg.attention_bias}, tie_embeddings={cfg.tie_embeddings}) needs it. "
                "Check that config.json belongs to these weights."
            ) from None
        expected = rule.hf_shape(cfg)
        if tuple(w.shape) != expected:
            raise WeightsError(
                f"{source}: tensor {name!r} has shape {tuple(w.shape)}, but config.json "
                f"implies {expected}. Check that config.json belongs to these weights."
            )
        return np.asarray(rule.to_ours(w, cfg)).astype(dtype)

    params = {}
    for rule in _rules(cfg):
        if not rule.per_layer:
            params[rule.path] = read(rule.hf_name, rule)
            continue
        first = read(rule.hf_name.format(i=0), rule)
        stacked = np.empty((cfg.num_layers, *first.shape), dtype)
        stacked[0] = first
        for i in range(1, cfg.num_layers):
            stacked[i] = read(rule.hf_name.format(i=i), rule)
        params[rule.path] = stacked
    return params


def model_from_params(cfg: ModelConfig, params: dict[ParamPath, np.ndarray]) -> Transformer:
    """A ``Transformer`` holding ``params`` (built abstractly: no random init)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        array = params.pop(tuple(path))  # drop the host copy as soon as it is on device
        expected = variable.get_value().shape
        if array.shape != expected:
            raise WeightsError(
                f"parameter {'.'.join(path)} has shape {array.shape}, expected {expected}"
            )
        variable.set_value(jnp.asarray(array))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_tensors_from_model(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, array)`` for every tensor, in the model's parameter dtype."""
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for rule in _rules(cfg):
        value = np.asarray(flat[rule.path].get_value())
        if rule.per_layer:
            for i in range(cfg.num_layers):
                yield rule.hf_name.format(i=i), np.ascontiguousarray(rule.to_hf(value[i], cfg))
        else:
            yield rule.hf_name, np.ascontiguousarray(rule.to_hf(value, cfg))
