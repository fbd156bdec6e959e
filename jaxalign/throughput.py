"""Throughput of a training step: seconds, tokens per second and a model-FLOPs utilisation.

Model FLOPs per step follow the usual convention (PaLM, MaxText), over real (unpadded)
tokens only, so padding and packing never count as work (:func:`model_flops`): a forward
pass over a sequence of ``s`` tokens of a model with ``N`` parameters costs ``2·N·s``
plus its causal attention scores, ``2·W·s²`` (``W`` = layers × query heads × head size:
``QKᵀ`` and the weighted sum of values over the half of the ``s × s`` scores a causal
model uses); a training step is three forward passes' worth (the backward pass costs
two) and a frozen model that runs its own forward pass on every token (SPA's on-the-fly
reference) adds one. LoRA counts as full fine-tuning of its base, an upper bound.

The peak it is measured against: a TPU or GPU's nominal dense bfloat16 peak per chip
(:data:`NOMINAL_PEAKS`, by ``device_kind``) times the chips in use; on a CPU the best
float32 FLOP/s of a jitted 2048³ matmul, measured once per machine and kept in the
jaxalign cache (``peak_flops.json``); ``None`` for a device this table does not know.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Dense bfloat16 FLOP/s per chip, from the vendors' published specifications.
NOMINAL_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
}


def batch_tokens(batch: dict) -> int:
    """Real tokens in a host batch: the sum of its attention masks (every row kind)."""
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("attention_mask")))


def batch_squares(batch: dict) -> int:
    """``Σ s²`` over a host batch's sequences (every row kind, ``s`` a row's real tokens):
    what its causal attention scores cost, up to :func:`attention_width`."""
    return int(
        sum(
            np.sum(np.sum(np.asarray(v, np.int64), axis=-1) ** 2)
            for k, v in batch.items()
            if k.endswith("attention_mask")
        )
    )


def attention_width(model) -> int:
    """``W`` = layers × query heads × head size of a model with a ``config`` (a
    :class:`jaxalign.models.llama.ModelConfig`), 0 for one without (attention not counted)."""
    config = getattr(model, "config", None)
    if not hasattr(config, "num_heads"):
        return 0
    head = config.head_dim or config.hidden_size // config.num_heads
    return int(config.num_layers * config.num_heads * head)


def position_cost(model, params: int) -> Callable[[int], float]:
    """``L -> `` estimated forward FLOPs per computed position of a row of ``L`` tokens, for
    choosing how to pack rows (:func:`jaxalign.data.packing.cheapest_layout`): the matmuls
    of a model of ``params`` parameters less its embeddings (a lookup; the output layer
    runs only on scored tokens, however they are packed), ``2·N'``, plus the attention
    scores it computes for a row, ``4·W`` per key a query scores
    (:meth:`jaxalign.models.llama.ModelConfig.keys_per_query`). Without a model ``config``:
    ``2·params``."""
    config = getattr(model, "config", None)
    width = attention_width(model)
    if not width:
        return lambda length: 2.0 * params
    tables = 1 if config.tie_embeddings else 2
    dense = 2.0 * max(params - tables * config.vocab_size * config.hidden_size, 0)
    return lambda length: dense + 4.0 * width * config.keys_per_query(length)


def model_flops(tokens: int, squares: int, params: int, width: int, passes: int = 3) -> float:
    """Model FLOPs of ``passes`` forward passes' worth of work over ``tokens`` real tokens
    whose sequences' squared lengths sum to ``squares``: ``passes · (2·N·tokens +
    2·W·squares)``, ``N = params``, ``W = width`` (:func:`attention_width`). A training step
    is 3 passes, 4 with a frozen model's forward beside it; a scoring pass is 1."""
    return passes * (2.0 * params * tokens + 2.0 * width * squares)


def parameter_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def measure_cpu_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 FLOP/s of a jitted ``n x n x n`` matmul on the CPU."""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _machine_key() -> str:
    return f"{platform.machine()}|{platform.processor() or platform.node()}|{os.cpu_count()}"


def peak_flops(devices, cache_dir: str | os.PathLike | None) -> float | None:
    """The peak FLOP/s ``devices`` (one kind) are measured against, or ``None``.

    TPU/GPU: :data:`NOMINAL_PEAKS` × the number of devices. CPU: the machine's measured
    matmul peak (all fake host devices share its cores), read from ``cache_dir`` when a
    measurement of this machine is there, else measured (about a second) and stored.
    """
    devices = list(devices)
    if not devices:
        return None
    kind = devices[0].device_kind
    if devices[0].platform != "cpu":
        nominal = NOMINAL_PEAKS.get(kind)
        return None if nominal is None else nominal * len(devices)
    path = None if cache_dir is None else Path(cache_dir) / "peak_flops.json"
    known = {}
    if path is not None and path.exists():
        try:
            known = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    key = _machine_key()
    if key not in known:
        known[key] = measure_cpu_matmul_peak()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known))
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache: measure again next time
    return float(known[key])


def step_throughput(
    seconds: float, tokens: int, flops: float, peak: float | None
) -> dict[str, float]:
    """``perf/*`` metrics of one step over ``tokens`` real tokens worth ``flops`` model
    FLOPs (:func:`model_flops`); ``perf/mfu`` only when the peak is known."""
    seconds = max(seconds, 1e-9)
    out = {
        "perf/step_seconds": seconds,
        "perf/tokens_per_second": tokens / seconds,
        "perf/model_tflops_per_second": flops / seconds / 1e12,
    }
    if peak:
        out["perf/mfu"] = flops / seconds / peak
    return out


# ----------------------------------------------------------------------------- compiles

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_compiles = {"compiles": 0, "compile_seconds": 0.0, "compile_cache_hits": 0}
_listening = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE:
        _compiles["compiles"] += 1
        _compiles["compile_seconds"] += duration


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
        _compiles["compile_cache_hits"] += 1


def compile_stats() -> dict[str, float]:
    """Programs compiled in this process so far (``compiles``; a program read back from the
    persistent compilation cache counts too, and also as a ``compile_cache_hits``), and the
    seconds spent (``compile_seconds``). Counting starts with the first call."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    return dict(_compiles)


def compiles_since(before: dict[str, float]) -> dict[str, float]:
    """:func:`compile_stats` now minus ``before``, seconds rounded to milliseconds."""
    now = compile_stats()
    out = {k: now[k] - before[k] for k in now}
    out["compile_seconds"] = round(out["compile_seconds"], 3)
    return out


# ----------------------------------------------------------------------------- decoding

_decoding = {
    "sampled_tokens": 0,
    "decoded_tokens": 0,
    "decode_seconds": 0.0,
    "warm_decoded_tokens": 0,
    "warm_decode_seconds": 0.0,
}


def record_decoding(
    sampled_tokens: int, decoded_tokens: int, seconds: float, *, compiled: bool = False
) -> None:
    """Counts one decoded batch: ``sampled_tokens`` kept (the real rows' responses, up to
    and including their EOS), ``decoded_tokens`` computed (every row of the batch, padding
    rows too, times the batch's decode steps: a row that has finished decodes on until its
    batch shrinks or its longest row ends), in ``seconds`` of wall time; ``compiled``: the
    batch traced and compiled its program first (it counts in the totals, not in the
    ``warm_*`` ones)."""
    _decoding["sampled_tokens"] += int(sampled_tokens)
    _decoding["decoded_tokens"] += int(decoded_tokens)
    _decoding["decode_seconds"] += float(seconds)
    if not compiled:
        _decoding["warm_decoded_tokens"] += int(decoded_tokens)
        _decoding["warm_decode_seconds"] += float(seconds)


def decoding_stats() -> dict[str, float]:
    """What :func:`record_decoding` has counted in this process so far."""
    return dict(_decoding)


def decoding_since(before: dict[str, float]) -> dict[str, float]:
    """The decoding done since ``before`` (a :func:`decoding_stats`) with its rates:
    ``sampled_tokens_per_second`` (what a round gets), ``decoded_tokens_per_second`` (what
    the sampler computes) and ``warm_decoded_tokens_per_second`` (the same over the batches
    that compiled nothing: the kernel's rate, comparable with ``benchmarks/decode.py``,
    which decodes every row to the same length). Empty when nothing was decoded."""
    now = decoding_stats()
    out = {k: now[k] - before[k] for k in now}
    if out["decoded_tokens"] <= 0:
        return {}
    seconds = max(out["decode_seconds"], 1e-9)
    out["sampled_tokens_per_second"] = round(out["sampled_tokens"] / seconds, 1)
    out["decoded_tokens_per_second"] = round(out["decoded_tokens"] / seconds, 1)
    if out["warm_decoded_tokens"] > 0:
        warm = max(out["warm_decode_seconds"], 1e-9)
        out["warm_decoded_tokens_per_second"] = round(out["warm_decoded_tokens"] / warm, 1)
    out["decode_seconds"] = round(out["decode_seconds"], 3)
    out["warm_decode_seconds"] = round(out["warm_decode_seconds"], 3)
    return out


# ----------------------------------------------------------------------------- scoring

_scoring = {
    "scored_sequences": 0,
    "scored_tokens": 0,
    "scored_positions": 0,
    "scoring_seconds": 0.0,
    "warm_scoring_seconds": 0.0,
    "warm_scoring_flops": 0.0,
}


def record_scoring(
    sequences: int,
    tokens: int,
    positions: int,
    flops: float,
    seconds: float,
    *,
    compiled: bool = False,
) -> None:
    """Counts one call of a scoring pass (:mod:`jaxalign.scoring`: the judge's and the
    reference's log-probs): ``sequences`` scored, their ``tokens``, the ``positions`` the
    call computed (its rows × their length: padding too), its forward pass's model FLOPs
    (:func:`model_flops`' per-pass count) and ``seconds`` of wall time; ``compiled``: the
    call compiled its program first (it counts in the totals, not in the ``warm_*`` ones)."""
    _scoring["scored_sequences"] += int(sequences)
    _scoring["scored_tokens"] += int(tokens)
    _scoring["scored_positions"] += int(positions)
    _scoring["scoring_seconds"] += float(seconds)
    if not compiled:
        _scoring["warm_scoring_seconds"] += float(seconds)
        _scoring["warm_scoring_flops"] += float(flops)


def scoring_stats() -> dict[str, float]:
    """What :func:`record_scoring` has counted in this process so far."""
    return dict(_scoring)


def scoring_since(before: dict[str, float], peak: float | None = None) -> dict[str, float]:
    """The scoring done since ``before`` (a :func:`scoring_stats`) with its rates:
    ``scored_sequences_per_second`` and ``scored_tokens_per_second`` (compiles included),
    ``padding`` (the share of computed positions that held no token) and, over the calls
    that compiled nothing, ``warm_model_tflops_per_second`` and ``warm_mfu`` (against
    ``peak``, when known). Empty when nothing was scored."""
    now = scoring_stats()
    out = {k: now[k] - before[k] for k in now}
    if out["scored_sequences"] <= 0:
        return {}
    seconds = max(out["scoring_seconds"], 1e-9)
    out["scored_sequences_per_second"] = round(out["scored_sequences"] / seconds, 2)
    out["scored_tokens_per_second"] = round(out["scored_tokens"] / seconds, 1)
    out["padding"] = round(1 - out["scored_tokens"] / max(out["scored_positions"], 1), 3)
    flops = out.pop("warm_scoring_flops")
    if out["warm_scoring_seconds"] > 0:
        rate = flops / out["warm_scoring_seconds"]
        out["warm_model_tflops_per_second"] = round(rate / 1e12, 4)
        if peak:
            out["warm_mfu"] = round(rate / peak, 3)
    out["scoring_seconds"] = round(out["scoring_seconds"], 3)
    out["warm_scoring_seconds"] = round(out["warm_scoring_seconds"], 3)
    return out
