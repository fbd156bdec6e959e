"""A Llama-family decoder in Flax NNX: Llama 2/3, Mistral, Qwen2 and SmolLM2.

One model covers the family: pre-norm blocks of grouped-query attention with
rotary position embeddings and a SwiGLU MLP, RMSNorm everywhere, optional
q/k/v biases (Qwen2), optional tied input/output embeddings (SmolLM2), and
Llama-3's frequency-dependent RoPE scaling.

Parameter names follow Hugging Face's (``embed_tokens``, ``layers.self_attn.q_proj``,
...) so weight import and export are plain renames. The layers are stacked on a
leading ``layers`` axis and run with ``jax.lax.scan``: one compiled layer body,
whatever the depth, which keeps compile time flat from SmolLM2 to a 7B model.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``norm``, ``layers``); ``jaxalign.parallel``
maps them onto mesh axes with one rules table.

Shapes used below: ``B`` batch, ``T`` new tokens, ``S`` key/value slots,
``D`` hidden size, ``H`` query heads, ``K`` key/value heads, ``Dh`` head size,
``F`` MLP size, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = tuple(_DTYPES)  # what every dtype setting (model, compute, KV cache) accepts


def dtype_from_name(name: str) -> Any:
    """Returns the jnp dtype for ``float32``/``bfloat16``/``float16``, or a clear error."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: bool | str) -> tuple[bool, Any]:
    """``(recompute?, jax.checkpoint policy)`` for a ``ModelConfig.remat`` value.

    ``"dots"`` keeps the outputs of the weight matmuls (no batch dimensions) and
    recomputes the rest of each layer: the attention scores and probabilities
    (``[B, H, T, T]`` per layer, the largest activations at moderate lengths), the
    norms and the SwiGLU product. It costs about one attention forward per layer
    and saves most of the activation memory and its first-touch cost."""
    if isinstance(remat, bool):
        remat = "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"ModelConfig.remat must be true, false or one of {sorted(REMAT_POLICIES)}, "
            f"got {remat!r}"
        )
    return remat != "none", REMAT_POLICIES[remat]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    ``kind="llama3"``: Llama 3.1's smooth, frequency-dependent scaling (long
    wavelengths divided by ``factor``, short ones kept, a linear blend between).
    ``kind="linear"``: every position divided by ``factor`` (position interpolation).
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (defaults: SmolLM2-135M)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int | None = None  # None: hidden_size // num_heads, as in HF configs
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases, as Qwen2 has
    max_position_embeddings: int = 8192
    architecture: str = "llama"  # llama | mistral | qwen2: the HF class to export as
    param_dtype: str = "float32"  # master weights
    dtype: str = "float32"  # activations and matmuls
    # What the backward pass recomputes instead of storing (see REMAT_POLICIES):
    # False/"none" stores every activation, True/"full" recomputes each layer,
    # "dots" stores only the projections' outputs and recomputes attention scores,
    # softmax and element-wise ops.
    remat: bool | str = False
    # Attention without a cache is causal: its queries are split into up to this many
    # blocks of at least CAUSAL_BLOCK_MIN queries, and each block attends only to the
    # keys up to its own end, skipping the score blocks above the diagonal (4 blocks:
    # 37.5% of the scores). 1 computes the whole [T, T] score matrix.
    causal_blocks: int = 4
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads}); set head_dim explicitly"
            )
        if not isinstance(self.causal_blocks, int) or self.causal_blocks < 1:
            raise ValueError(
                f"ModelConfig.causal_blocks must be an integer >= 1, got {self.causal_blocks!r}"
            )
        dtype_from_name(self.param_dtype)
        dtype_from_name(self.dtype)
        remat_policy(self.remat)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def keys_per_query(self, length: int) -> float:
        """Keys a query of a ``length``-token row scores on average, without a KV cache:
        every key up to the end of its causal block (:func:`causal_block_bounds`), whether
        one sequence fills the row or several are packed in it."""
        bounds = causal_block_bounds(length, self.causal_blocks)
        return sum((hi - lo) * hi for lo, hi in itertools.pairwise(bounds)) / length

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` dict.

        Accepts both the older ``rope_theta``/``rope_scaling`` keys and the newer
        ``rope_parameters`` dict.
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; jaxalign supports "
                "llama, mistral and qwen2 (Llama 2/3, Mistral, Qwen2, SmolLM2)"
            )
        rope = dict(hf.get("rope_parameters") or {})
        if hf.get("rope_scaling"):
            rope.update(hf["rope_scaling"])
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind == "llama3":
            scaling = RopeScaling(
                kind="llama3",
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", 8192)
                ),
            )
        elif kind == "linear":
            scaling = RopeScaling(kind="linear", factor=float(rope["factor"]))
        elif kind not in ("default", None):
            raise ValueError(f"unsupported RoPE scaling type {kind!r} in config.json")
        num_heads = hf["num_attention_heads"]
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim"),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            architecture=model_type,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """The ``config.json`` dict that transformers loads this model from."""
        class_name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
            self.architecture, "Qwen2ForCausalLM"
        )
        hf = {
            "architectures": [class_name],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.dim_per_head,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
        }
        if self.architecture == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.architecture == "mistral":
            hf["sliding_window"] = None
        if self.rope_scaling is not None:
            s = self.rope_scaling
            hf["rope_scaling"] = (
                {
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                }
                if s.kind == "llama3"
                else {"rope_type": "linear", "factor": s.factor}
            )
        return hf


# (stacked, fn): see Transformer.hidden_states.
LayerAdapter = tuple[Any, Callable[[nnx.State, Any], nnx.State]]


@flax.struct.dataclass
class KVCache:
    """Pre-allocated keys and values for incremental decoding.

    Rows are left-padded: slot ``s`` of every row is written at the same step, and
    ``mask[b, s]`` says whether that slot holds a real token of row ``b``. Slots
    come after the head axis so that each (row, head) pair's keys are one
    contiguous ``[S, Dh]`` matrix, which attention multiplies without a transpose.
    """

    k: jax.Array  # [L, B, K, S, Dh]
    v: jax.Array  # [L, B, K, S, Dh]
    mask: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32: the next slot to write

    @property
    def max_length(self) -> int:
        return self.k.shape[3]


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of ``max_length`` slots for ``batch_size`` rows."""
    dtype = dtype or dtype_from_name(config.dtype)
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.dim_per_head)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
    )


def positions_from_mask(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Per-row positions of real tokens: 0, 1, 2... counting only unmasked tokens.

    ``attention_mask [B, T]``; padding tokens get the position of the token before
    them (0 for left padding), which is harmless since nothing attends to them.
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) + offset


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies ``[Dh/2]``, with Llama-3 or linear scaling applied."""
    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind != "llama3":
        raise ValueError(f"unknown RoPE scaling kind {s.kind!r}; expected 'llama3' or 'linear'")
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[B, T, Dh/2]`` float32, for ``positions [B, T]``.

    Computed once per forward pass and shared by every layer."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding in HF's half-split layout.

    ``x [B, T, ..., Dh]`` (any number of head axes after ``T``); ``rope`` from
    :func:`rope_tables`."""
    expand = (slice(None), slice(None)) + (None,) * (x.ndim - 3)
    cos, sin = rope[0][expand], rope[1][expand]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
    """``x [..., I] @ w [I, O] -> [..., O]`` as one 2-D matmul over the flattened rows.

    The same product as ``x @ w``; written on ``[rows, I]`` so that the weight
    gradient is ``rowsᵀ @ grad`` over one contracting axis, which XLA computes
    without transposing the (large) activation gradient first."""
    out = jnp.matmul(x.reshape(-1, x.shape[-1]), w, **kwargs)
    return out.reshape(*x.shape[:-1], w.shape[-1])


def project(x: jax.Array, w: jax.Array, vocab_major: bool) -> jax.Array:
    """Float32 ``x [..., D]`` times an output layer ``w``: ``[D, V]``, or ``[V, D]`` when
    ``vocab_major`` (contracted on its second axis, no transpose); ``-> [..., V]``."""
    w = w.astype(x.dtype)
    if not vocab_major:
        return dense(x, w, preferred_element_type=jnp.float32)
    flat = jax.lax.dot_general(
        x.reshape(-1, x.shape[-1]),
        w,
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    return flat.reshape(*x.shape[:-1], w.shape[0])


def _param(rngs: nnx.Rngs, shape, axes, config: ModelConfig, init=None) -> nnx.Param:
    dtype = dtype_from_name(config.param_dtype)
    if init is None:
        init = jax.nn.initializers.normal(config.initializer_range)
    return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32."""

    def __init__(self, dim: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), ("norm",), config, jax.nn.initializers.ones)
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.dim_per_head
        self.config = config
        self.q_proj = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), config)
        self.k_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), config)
        self.v_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), config)
        self.o_proj = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), config)
        if config.attention_bias:
            zeros = jax.nn.initializers.zeros
            self.q_bias = _param(rngs, (h, dh), ("heads", "head_dim"), config, zeros)
            self.k_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), config, zeros)
            self.v_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), config, zeros)

    def qkv_weight(self, dtype) -> jax.Array:
        """Query, key and value projections as one ``[D, K, G + 2, Dh]`` matrix.

        Query head ``j * G + i`` serves key/value head ``j`` (``G`` = query heads per
        key/value head, the grouping of HF's ``repeat_kv``), so grouping by ``K`` keeps
        each projection's head sharding and one matmul replaces three."""
        cfg = self.config
        d, kv, dh = cfg.hidden_size, cfg.num_kv_heads, cfg.dim_per_head
        q = self.q_proj[...].reshape(d, kv, -1, dh)
        k, v = self.k_proj[...][:, :, None], self.v_proj[...][:, :, None]
        return jnp.concatenate([q, k, v], axis=2).astype(dtype)

    def qkv_bias(self, dtype) -> jax.Array:
        """The biases in :meth:`qkv_weight`'s layout, ``[K, G + 2, Dh]``."""
        kv, dh = self.config.num_kv_heads, self.config.dim_per_head
        q = self.q_bias[...].reshape(kv, -1, dh)
        k, v = self.k_bias[...][:, None], self.v_bias[...][:, None]
        return jnp.concatenate([q, k, v], axis=1).astype(dtype)

    def __call__(self, x, rope, key_mask, cache_kv=None, cache_index=None):
        """``x [B,T,D]``; ``rope`` from :func:`rope_tables`; ``key_mask [B,T,S]`` says
        which keys each query may see.

        Without a cache the keys are this call's tokens (``S == T``). With
        ``cache_kv = (k [B,K,S,Dh], v [B,K,S,Dh])`` the new keys and values are
        written at slot ``cache_index`` and attention runs over all ``S`` slots; without,
        the queries run in :attr:`ModelConfig.causal_blocks` blocks (:func:`attend`), so
        ``key_mask`` must then be causal: no query sees a later key."""
        cfg = self.config
        dtype = x.dtype
        b, t, _ = x.shape
        kv, dh = cfg.num_kv_heads, cfg.dim_per_head
        g = cfg.num_heads // kv
        qkv = dense(x, self.qkv_weight(dtype).reshape(x.shape[-1], -1))
        qkv = qkv.reshape(b, t, kv, g + 2, dh)
        if cfg.attention_bias:
            qkv = qkv + self.qkv_bias(dtype)
        q = apply_rope(qkv[:, :, :, :g], rope) * jnp.asarray(1 / math.sqrt(dh), dtype)
        k = apply_rope(qkv[:, :, :, g], rope).transpose(0, 2, 1, 3)  # [B,K,T,Dh]
        v = qkv[:, :, :, g + 1].transpose(0, 2, 1, 3)
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_kv = (k, v)
            k, v = k.astype(dtype), v.astype(dtype)
        else:
            new_kv = None
        q = q.transpose(0, 2, 3, 1, 4)  # [B,K,G,T,Dh]
        if cache_kv is None:  # causal: query block [lo, hi) sees keys [0, hi) only
            bounds = causal_block_bounds(t, cfg.causal_blocks)
            blocks = [
                attend(q[:, :, :, lo:hi], k[:, :, :hi], v[:, :, :hi], key_mask[:, lo:hi, :hi])
                for lo, hi in itertools.pairwise(bounds)
            ]
            out = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=3)
        else:
            out = attend(q, k, v, key_mask)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, -1)  # [B,T,H·Dh], heads in order
        return dense(out, self.o_proj[...].reshape(-1, cfg.hidden_size).astype(dtype)), new_kv


CAUSAL_BLOCK_MIN = 64  # queries per block of the blocked causal attention, at least


def causal_block_bounds(t: int, blocks: int) -> list[int]:
    """Query-block boundaries ``[0, ..., t]`` of a causal attention over ``t`` tokens: up to
    ``blocks`` blocks of nearly equal size, none under :data:`CAUSAL_BLOCK_MIN` queries
    (one block when ``t < 2 · CAUSAL_BLOCK_MIN``)."""
    n = max(1, min(blocks, t // CAUSAL_BLOCK_MIN))
    return [t * i // n for i in range(n + 1)]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Grouped-query attention: ``q [B,K,G,T,Dh]`` (scaled), ``k, v [B,K,S,Dh]``,
    ``key_mask [B,T,S]`` -> ``[B,K,G,T,Dh]``.

    Scores are computed per key/value head over all its ``G·T`` queries at once,
    ``[B,K,G·T,Dh] x [B,K,S,Dh]``: the batched matmuls XLA runs fastest. A query that
    sees no key gets the mean of all ``S`` values."""
    b, kv, g, t, dh = q.shape
    s = k.shape[2]
    dtype = q.dtype
    scores = jnp.einsum(
        "bkqd,bksd->bkqs", q.reshape(b, kv, g * t, dh), k, preferred_element_type=jnp.float32
    )
    scores = scores.reshape(b, kv, g, t, s)
    scores = jnp.where(key_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, kv, g * t, s)
    return jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv, g, t, dh)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), config)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), config)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), config)

    def __call__(self, x):
        dtype = x.dtype
        gate = dense(x, self.gate_proj[...].astype(dtype))
        up = dense(x, self.up_proj[...].astype(dtype))
        return dense(jax.nn.silu(gate) * up, self.down_proj[...].astype(dtype))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config, rngs=rngs)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, rope, key_mask, cache_kv=None, cache_index=None):
        attn, new_kv = self.self_attn(
            self.input_layernorm(x), rope, key_mask, cache_kv, cache_index
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


class Transformer(nnx.Module):
    """The decoder. ``model(tokens, positions, attention_mask, cache) -> (logits, cache)``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _param(
            rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = _param(
                rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), config
            )

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache | None = None,
        adapter: LayerAdapter | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states ``[B,T,D]`` (and the updated cache).

        ``tokens, positions [B,T] int32``; ``attention_mask [B,T]`` is 1 on real
        tokens. Without a cache, attention is causal over this call's tokens.
        With one, the tokens are written at ``cache.index`` and may attend to
        every earlier real slot. ``adapter``: ``(stacked, fn)``, a pytree stacked on the
        layer axis that the layer scan carries beside the layers' parameters, and
        ``fn(layer_params, layer_slice) -> layer_params`` applied inside the scan (LoRA's
        ``W + s·A@B``, :class:`jaxalign.models.lora.AdaptedTransformer`), so the changed
        weights exist for one layer at a time, in the forward and the backward pass.
        ``segment_ids [B,T]`` (no cache): several sequences packed in one row, a token
        attending only to earlier tokens of its own segment (``positions`` then restart at
        each segment; :mod:`jaxalign.data.packing`).
        """
        cfg = self.config
        dtype = dtype_from_name(cfg.dtype)
        attention_mask = attention_mask.astype(bool)
        t = tokens.shape[1]
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dtype)
        rope = rope_tables(positions, rope_frequencies(cfg))
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            key_mask = causal[None] & attention_mask[:, None, :]
            if segment_ids is not None:
                key_mask = key_mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
            index, kv_mask = None, None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) cannot be used with a KV cache")
            index = cache.index
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            slots = jnp.arange(cache.max_length)
            visible = slots[None, :] <= index + jnp.arange(t)[:, None]  # [T,S]
            key_mask = visible[None] & kv_mask[:, None, :]

        graphdef, layer_state = nnx.split(self.layers)

        stacked, adapt = (None, None) if adapter is None else adapter

        def layer_step(x, layer_in):
            params, kv, extra = layer_in
            if adapt is not None:
                params = adapt(params, extra)
            layer = nnx.merge(graphdef, params)
            x, new_kv = layer(x, rope, key_mask, kv, index)
            return x, new_kv

        recompute, policy = remat_policy(cfg.remat)
        if recompute:
            layer_step = jax.checkpoint(layer_step, prevent_cse=False, policy=policy)
        kv_in = None if cache is None else (cache.k, cache.v)
        x, kv_out = jax.lax.scan(layer_step, x, (layer_state, kv_in, stacked))
        if cache is not None:
            cache = KVCache(k=kv_out[0], v=kv_out[1], mask=kv_mask, index=index + t)
        return self.norm(x), cache

    def output_embedding(self) -> jax.Array:
        """The ``[D, V]`` output projection (the transposed input embedding when tied)."""
        if self.config.tie_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def output_layer(self) -> tuple[jax.Array, bool]:
        """The output projection as stored, ``(w, vocab_major)``: the ``[V, D]`` input
        embedding when tied (``vocab_major`` True), else the ``[D, V]`` head. The chunked
        log-prob code takes it so (:func:`project`): a tied model's ``[D, V]`` transpose,
        113 MB for SmolLM2, is then never materialised."""
        if self.config.tie_embeddings:
            return self.embed_tokens[...], True
        return self.lm_head[...], False

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits ``[..., V]`` from final hidden states ``[..., D]``."""
        w = self.output_embedding().astype(hidden.dtype)
        return dense(hidden, w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Float32 logits ``[B,T,V]`` and the updated cache (``None`` without one)."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        hidden, cache = self.hidden_states(tokens, positions, attention_mask, cache)
        return self.logits(hidden), cache


def abstract_model(config: ModelConfig) -> Transformer:
    """The model's structure with shape-only parameters (no memory), for loading weights."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
