"""LoRA adapters for the Llama-family ``Transformer`` (Hu et al. 2022, arXiv 2106.09685).

A linear map ``W [in, out]`` becomes ``W + s·A@B`` with ``A [in, r]``, ``B [r, out]``
and ``s = α/r`` (PLE: r = 8, α = 16, all linear modules). ``B`` starts at zero,
so the adapted model starts equal to the base one; ``A`` starts like PEFT's
(Kaiming-uniform, ``U(−1/√in, 1/√in)``).

jaxalign keeps heads split out in its kernels, so "in" and "out" may be several
axes: ``q_proj [L, D, H, Dh]`` has in = ``(D,)`` and out = ``(H, Dh)``, so its
adapter is ``A [L, D, r]``, ``B [L, r, H, Dh]``; ``o_proj [L, H, Dh, D]`` has
in = ``(H, Dh)``, so ``A [L, H, Dh, r]``, ``B [L, r, D]``. ``L`` is the stacked
layer axis: every layer has its own adapter.

The adapters are a separate pytree (:class:`LoraAdapters`, an NNX module holding
only them), so training them with :func:`jaxalign.training.make_train_step` is
training "the model" ``LoraAdapters`` while the base parameters ride along as
the step's non-differentiated ``frozen`` argument; the base cannot change.

Design: the train step runs the ordinary model on merged kernels ``W + s·A@B``
(exact: the same network as the adapter form ``x@W + s·(x@A)@B`` up to float
rounding), merged one layer at a time inside the layer scan
(:class:`AdaptedTransformer`), so neither a merged copy of the model nor a dense
gradient of every kernel is ever held whole; :func:`apply_lora` merges the whole
model at once, for sampling and export. The base parameters without adapters are
the reference model, so no second copy of the model is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.llama import Transformer

# name -> (parameter path in the Transformer state, number of "in" axes after L)
LORA_TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "q_proj": (("layers", "self_attn", "q_proj"), 1),
    "k_proj": (("layers", "self_attn", "k_proj"), 1),
    "v_proj": (("layers", "self_attn", "v_proj"), 1),
    "o_proj": (("layers", "self_attn", "o_proj"), 2),
    "gate_proj": (("layers", "mlp", "gate_proj"), 1),
    "up_proj": (("layers", "mlp", "up_proj"), 1),
    "down_proj": (("layers", "mlp", "down_proj"), 1),
}
ALL_LINEAR = tuple(LORA_TARGETS)


def lora_scaling(rank: int, alpha: float) -> float:
    """``s = α / r`` (PEFT's ``lora_alpha / r``; PLE: 16 / 8 = 2)."""
    return float(alpha) / float(rank)


def _base_param(base_params: nnx.State, path: tuple[str, ...]) -> nnx.Variable:
    node = base_params
    for key in path:
        node = node[key]
    return node


class LoraPair(nnx.Module):
    """One adapted kernel's ``a [L, *in, r]`` and ``b [L, r, *out]``."""

    def __init__(self, a: nnx.Param, b: nnx.Param):
        self.a = a
        self.b = b


class LoraAdapters(nnx.Module):
    """The adapters of every targeted kernel of a ``Transformer``; nothing else.

    ``LoraAdapters(model, rank=8, targets=ALL_LINEAR, rngs=nnx.Rngs(0))``; the
    attribute named after each target (``q_proj``, ...) is a :class:`LoraPair`.
    Parameters carry logical axis names derived from the base kernel's, so they
    shard like it on a mesh.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        rank: int = 8,
        targets: Sequence[str] = ALL_LINEAR,
        rngs: nnx.Rngs,
    ):
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(
                f"unknown LoRA targets {unknown}; choose from {', '.join(LORA_TARGETS)}"
            )
        if rank < 1:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank = rank
        self.targets = tuple(targets)
        base = nnx.state(model, nnx.Param)
        specs = nnx.get_partition_spec(base)
        for name in self.targets:
            path, n_in = LORA_TARGETS[name]
            w = _base_param(base, path)
            axes = tuple(_base_param(specs, path).get_value())
            shape = w.shape
            layers, ins, outs = shape[0], shape[1 : 1 + n_in], shape[1 + n_in :]
            fan_in = math.prod(ins)
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(
                rngs.params(), (layers, *ins, rank), w.dtype, minval=-bound, maxval=bound
            )
            b = jnp.zeros((layers, rank, *outs), w.dtype)
            a_axes = (axes[0], *axes[1 : 1 + n_in], None)
            b_axes = (axes[0], None, *axes[1 + n_in :])
            setattr(
                self,
                name,
                LoraPair(
                    nnx.Param(a, sharding_names=a_axes, eager_sharding=False),
                    nnx.Param(b, sharding_names=b_axes, eager_sharding=False),
                ),
            )


def lora_delta(a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``s · A@B`` per layer: ``a [L, *in, r]``, ``b [L, r, *out]`` → ``[L, *in, *out]``."""
    layers, rank = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    a2 = a.reshape(layers, math.prod(ins), rank)
    b2 = b.reshape(layers, rank, math.prod(outs))
    delta = jnp.einsum("lir,lro->lio", a2, b2, preferred_element_type=jnp.float32)
    return (scaling * delta).reshape(layers, *ins, *outs)


def apply_lora(base_params: nnx.State, lora_params: nnx.State, scaling: float) -> nnx.State:
    """The base parameters with every adapted kernel replaced by ``W + s·A@B``.

    ``base_params``: ``nnx.split(model)[1]`` (or ``nnx.state(model)``) of a
    ``Transformer``; ``lora_params``: ``nnx.state(adapters)`` of a
    :class:`LoraAdapters` (any subset of targets). Kernels keep their dtype;
    the product is formed in float32. Pure and differentiable in both arguments.
    """
    deltas = {}
    for name, (path, _) in LORA_TARGETS.items():
        if name in lora_params:
            pair = lora_params[name]
            deltas[path] = lora_delta(pair["a"].get_value(), pair["b"].get_value(), scaling)

    return _add_deltas(base_params, deltas)


def merged_model(model: Transformer, adapters: LoraAdapters, scaling: float) -> Transformer:
    """A new ``Transformer`` whose kernels are ``W + s·A@B`` (for sampling or export)."""
    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, apply_lora(params, nnx.state(adapters), scaling))


def merge_layer(layer_params: nnx.State, layer_adapters: nnx.State, scaling: float) -> nnx.State:
    """One decoder layer's parameters with every adapted kernel replaced by ``W + s·A@B``.

    ``layer_params``: one layer's slice of ``nnx.split(model.layers)[1]``; ``layer_adapters``:
    the same layer's slice of a :class:`LoraAdapters` state. Called inside the layer scan
    (:class:`AdaptedTransformer`), so one layer's merged kernels exist at a time.
    """
    deltas = {}
    for name, (path, _) in LORA_TARGETS.items():
        if name in layer_adapters:
            pair = layer_adapters[name]
            # A layer axis of 1 keeps this product a batched matmul, which the "dots" remat
            # policy does not store: the backward pass recomputes each layer's merged
            # kernels instead of keeping all of them from the forward pass.
            a, b = pair["a"].get_value()[None], pair["b"].get_value()[None]
            deltas[path[1:]] = lora_delta(a, b, scaling)[0]
    return _add_deltas(layer_params, deltas)


def _add_deltas(params: nnx.State, deltas: dict) -> nnx.State:
    """``params`` with ``W + delta`` at each path of ``deltas`` (added in float32, stored
    back in ``W``'s dtype)."""

    def merge(key_path, leaf):
        path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        if path in deltas:
            return (leaf.astype(jnp.float32) + deltas[path]).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(merge, params)


class AdaptedTransformer:
    """A ``Transformer`` seen through LoRA adapters, merged one layer at a time.

    It offers what the loss functions use of a model (``config``, ``hidden_states``,
    ``output_embedding``, ``output_layer``, ``logits``), computing with ``W + s·A@B`` for
    every adapted kernel. :func:`apply_lora` builds the whole merged model at once, which for a 7B
    model costs another copy of the weights and, in the backward pass, a dense gradient
    of every adapted kernel; here the merge happens inside the layer scan
    (:func:`merge_layer`), so both exist for one layer at a time. The two are the same
    network: with ``B = 0`` both equal the base model exactly.
    """

    def __init__(self, base: Transformer, adapters: nnx.State, scaling: float):
        self.base = base
        self.adapters = adapters
        self.scaling = scaling
        self.config = base.config

    def hidden_states(self, tokens, positions, attention_mask, cache=None, segment_ids=None):
        adapter = (self.adapters, lambda p, a: merge_layer(p, a, self.scaling))
        return self.base.hidden_states(
            tokens, positions, attention_mask, cache, adapter, segment_ids=segment_ids
        )

    def output_embedding(self) -> jax.Array:
        return self.base.output_embedding()  # embeddings are not LoRA targets

    def output_layer(self) -> tuple[jax.Array, bool]:
        return self.base.output_layer()

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.base.logits(hidden)


def lora_loss_fn(base_graphdef: nnx.GraphDef, loss_fn, scaling: float, *, reference=False):
    """Wraps a policy loss function so that the trained "model" is a :class:`LoraAdapters`.

    The returned ``fn(adapters, batch, algo_state, step, rng, frozen)`` expects the base
    parameters as ``frozen`` (see :func:`jaxalign.training.make_train_step`'s
    ``frozen_shardings``) and calls ``loss_fn(policy, batch, algo_state, step, rng, ref)``
    on the policy base ⊕ adapters (an :class:`AdaptedTransformer`). Gradients reach only
    the adapters.

    ``reference=True``: ``frozen`` is ``{"base": base params, "reference": adapters}`` and
    ``ref`` is the model base ⊕ those adapters (SPA's on-the-fly π_{i-1}: the previous
    round's adapters on the same frozen base, so no second copy of the weights); else
    ``ref`` is ``None``.
    """

    def wrapped(adapters, batch, algo_state, step, rng, frozen=None):
        if frozen is None:
            raise ValueError(
                "LoRA training needs the base parameters as train_step's `frozen` argument"
            )
        frozen = jax.lax.stop_gradient(frozen)
        base_params = frozen["base"] if reference else frozen
        base = nnx.merge(base_graphdef, base_params)
        policy = AdaptedTransformer(base, nnx.state(adapters), scaling)
        ref = AdaptedTransformer(base, frozen["reference"], scaling) if reference else None
        return loss_fn(policy, batch, algo_state, step, rng, ref)

    return wrapped
