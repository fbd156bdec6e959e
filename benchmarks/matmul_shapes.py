"""The CPU's float32 matmul rates at SmolLM2-135M's shapes, XLA against torch, and its
memory bandwidth: the ceilings the train step and decoding are measured against.

For each shape ``m x k x n`` (``T``: the weight is stored ``[n, k]``, as the tied output
layer is): the best time of one matmul repeated on the same operands (weights hot in
cache), and the time per matmul of a dependent chain over 30 layers' distinct weights
(``x @ A_i @ B_i``, as a decode step streams every layer's weights once). Decode shapes have
``m = 16`` rows (decode.py's batch), train shapes ``m = 4096`` (8 pairs × 2 × 256 tokens).
Bandwidth: the best read rate of a 512 MiB float32 sum in torch (all threads).

Each framework runs in its own process.

    python benchmarks/matmul_shapes.py

Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SHAPES = [  # (m, k, n, weight stored transposed)
    (16, 576, 960, False),  # decode: q/k/v projection
    (16, 576, 1536, False),  # decode: gate / up
    (16, 1536, 576, False),  # decode: down
    (16, 576, 49152, True),  # decode: tied output layer
    (4096, 576, 1536, False),  # train: gate / up
    (4096, 1536, 576, False),  # train: down
    (2048, 576, 49152, True),  # train: output layer, one log-prob chunk of 2048 positions
    (2048, 2048, 2048, False),  # the square peak
]
CHAIN = (16, 576, 1536, 30)  # m, k, n, layers: x @ A_i [k, n] @ B_i [n, k]


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _repeats(flops: float) -> int:
    return max(3, min(50, int(2e10 / flops)))


def run_xla() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = {}
    for m, k, n, t in SHAPES:
        a = jnp.ones((m, k), jnp.float32)
        w = jnp.ones((n, k) if t else (k, n), jnp.float32)
        f = jax.jit(lambda a, w, t=t: a @ w.T if t else a @ w)
        flops = 2.0 * m * k * n
        s = _best(lambda f=f, a=a, w=w: f(a, w).block_until_ready(), _repeats(flops))
        out[f"{m}x{k}x{n}{'T' if t else ''}"] = flops / s / 1e9
    m, k, n, layers = CHAIN
    rng = np.random.default_rng(0)
    a_s = [jnp.asarray(rng.random((k, n), np.float32) * 0.01) for _ in range(layers)]
    b_s = [jnp.asarray(rng.random((n, k), np.float32) * 0.01) for _ in range(layers)]

    @jax.jit
    def chain(x, a_s, b_s):
        for a, b in zip(a_s, b_s, strict=True):
            x = (x @ a) @ b
        return x

    x = jnp.ones((m, k), jnp.float32)
    s = _best(lambda: chain(x, a_s, b_s).block_until_ready(), 5)
    out["chain_ms_per_matmul"] = s / (2 * layers) * 1e3
    out["chain_gb_per_s"] = 2 * layers * k * n * 4 / s / 1e9
    return out


def run_torch() -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    with torch.inference_mode():
        for m, k, n, t in SHAPES:
            a = torch.ones(m, k)
            w = torch.ones(n, k) if t else torch.ones(k, n)
            flops = 2.0 * m * k * n
            s = _best(lambda a=a, w=w, t=t: a @ w.T if t else a @ w, _repeats(flops))
            out[f"{m}x{k}x{n}{'T' if t else ''}"] = flops / s / 1e9
        m, k, n, layers = CHAIN
        rng = np.random.default_rng(0)
        a_s = [torch.from_numpy(rng.random((k, n), np.float32) * 0.01) for _ in range(layers)]
        b_s = [torch.from_numpy(rng.random((n, k), np.float32) * 0.01) for _ in range(layers)]

        def chain():
            x = torch.ones(m, k)
            for a, b in zip(a_s, b_s, strict=True):
                x = (x @ a) @ b
            return x

        s = _best(chain, 5)
        out["chain_ms_per_matmul"] = s / (2 * layers) * 1e3
        out["chain_gb_per_s"] = 2 * layers * k * n * 4 / s / 1e9
        big = torch.ones(128 * 1024 * 1024)
        out["read_gb_per_s"] = big.numel() * 4 / _best(big.sum, 5) / 1e9
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_xla() if sys.argv[2] == "xla" else run_torch()))
        return 0
    from machine import cpu_description

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    sides = {}
    for side in ("xla", "torch"):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", side],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    shapes = [k for k in sides["xla"] if k[0].isdigit()]
    result = {
        "benchmark": "matmul_shapes",
        "gflops": {
            k: {"xla": round(sides["xla"][k], 1), "torch": round(sides["torch"][k], 1)}
            for k in shapes
        },
        "chain_16x576x1536_ms_per_matmul": {
            s: round(sides[s]["chain_ms_per_matmul"], 3) for s in sides
        },
        "chain_weight_gb_per_s": {s: round(sides[s]["chain_gb_per_s"], 1) for s in sides},
        "memory_read_gb_per_s": round(sides["torch"]["read_gb_per_s"], 1),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
