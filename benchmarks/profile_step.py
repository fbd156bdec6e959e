"""Where a jitted program's time goes on the CPU: a per-op table from an XLA profile.

Profiles jaxalign's DPO step at ``benchmarks/train_step.py``'s shape (SmolLM2-135M, float32,
8 pairs × 256 tokens, reference log-probs precomputed) with ``jax.profiler``, reads the
trace back (``jax.profiler.ProfileData``) and joins each timed op (a thunk of the compiled
program: a matmul library call, a fused loop, a copy, ...) with its instruction in the
compiled HLO: its kind, shapes and, for matmuls, FLOPs and achieved GFLOP/s.

    python benchmarks/profile_step.py [--pairs 8] [--length 256] [--chunk 64] [--top 25]
    python benchmarks/profile_step.py --xla-flags "--xla_cpu_use_xnnpack=false"

Prints the table (Markdown) and one JSON line. Ops of one step may run side by side on
the CPU client's threads: an op's seconds are the wall time it ran, with time shared with
other ops split evenly among them, so the seconds add up to the step's busy wall time and
an op's GFLOP/s is what the machine achieved while running it. One caveat: XLA's own
``dot`` thunks (Eigen; e.g. a backward pass's weight gradients) run asynchronously, and the
trace records only their launch, so their work is charged to the ops that run after them:
read the per-kind matmul row, which counts every matmul's FLOPs, rather than single rows.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ARRAY = re.compile(r"[a-z]+\d*\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass
class Instruction:
    name: str
    op: str
    shape: str
    rest: str

    @property
    def dims(self) -> list[int]:
        m = _ARRAY.match(self.shape.strip("()"))
        return [int(d) for d in m.group("dims").split(",") if d] if m else []

    def attribute(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=([%\w.\-]+|\{{[^}}]*\}})", self.rest)
        return m.group(1).lstrip("%") if m else None

    @property
    def source(self) -> str:
        """Where the op came from: ``forward``, ``backward`` (``transpose(jvp(...))``), or
        ``""``, with the JAX primitive (``op_name``'s last part), e.g. ``backward dot_general``."""
        m = re.search(r'op_name="([^"]+)"', self.rest)
        if not m:
            return ""
        name = m.group(1)
        phase = "backward" if "transpose(" in name else "forward" if "jvp(" in name else ""
        return f"{phase} {name.rsplit('/', 1)[-1]}".strip()

    def operands(self) -> list[str]:
        """Names of the operands: the ``%names`` before the argument list closes."""
        depth = 0
        for i, ch in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth < 0:
                return re.findall(r"%([\w.\-]+)", self.rest[:i])
        return re.findall(r"%([\w.\-]+)", self.rest)


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
    """HLO text → ``(instructions by name, instruction names by computation)``; the entry
    computation's are also under the key ``"ENTRY"``."""
    instructions: dict[str, Instruction] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    current = entry = ""
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group("name")
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        m = _INSTRUCTION.match(line)
        if m:
            ins = Instruction(m["name"], m["op"], m["shape"], m["rest"])
            instructions[ins.name] = ins
            computations[current].append(ins.name)
    computations["ENTRY"] = computations[entry]
    return instructions, computations


def dot_flops(ins: Instruction, instructions: dict[str, Instruction]) -> float:
    """``2 · |output| · |contracted|`` of a ``dot``."""
    operands = ins.operands()
    contracting = ins.attribute("lhs_contracting_dims")
    if not operands or operands[0] not in instructions or contracting is None:
        return 0.0
    lhs = instructions[operands[0]].dims
    dims = [int(d) for d in contracting.strip("{}").split(",") if d]
    return 2.0 * math.prod(ins.dims) * math.prod(lhs[d] for d in dims)


def op_flops(
    name: str, instructions: dict[str, Instruction], computations: dict[str, list[str]]
) -> float:
    """Matmul FLOPs of one timed op: a ``dot``, or the dots inside the computation it calls
    (a fusion handed to a matmul library, a custom call)."""
    ins = instructions.get(name)
    if ins is None:
        return 0.0
    if ins.op == "dot":
        return dot_flops(ins, instructions)
    called = ins.attribute("calls") or ins.attribute("to_apply")
    if ins.op in ("fusion", "custom-call") and called:
        return sum(
            op_flops(n, instructions, computations)
            for n in computations.get(called, [])
            if instructions[n].op in ("dot", "fusion")
        )
    return 0.0


def op_kind(name: str, instructions: dict[str, Instruction], flops: float) -> str:
    """A coarse category for the profile table."""
    ins = instructions.get(name)
    if ins is None:
        return "other"
    if flops > 0:
        return "matmul"
    if ins.op == "fusion":
        kind = ins.attribute("kind") or ""
        return "reduction fusion" if "reduce" in name else f"fusion ({kind.lstrip('k')})"
    if ins.op in ("copy", "transpose", "copy-start", "copy-done"):
        return "copy/transpose"
    if ins.op in ("dynamic-slice", "dynamic-update-slice", "slice", "concatenate", "pad"):
        return "slicing"
    if ins.op in ("while", "conditional", "call"):
        return "control"
    return ins.op


def profile_events(trace_dir: str) -> list[tuple[str, float]]:
    """``(hlo op, seconds)`` of every timed op in the trace under ``trace_dir``: the wall
    time it ran, with time it shared with other ops split evenly among them (the CPU client
    runs independent ops side by side), so the seconds add up to the busy wall time."""
    import jax

    spans = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        data = jax.profiler.ProfileData.from_file(path)
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if "hlo_op" in stats:
                        spans.append((event.start_ns, event.end_ns, str(stats["hlo_op"])))
    return split_overlaps(spans)


def split_overlaps(spans: list[tuple[float, float, str]]) -> list[tuple[str, float]]:
    """``(start_ns, end_ns, name)`` intervals → ``(name, seconds)``, each stretch of time
    divided evenly among the intervals open during it."""
    bounds = sorted({t for start, end, _ in spans for t in (start, end)})
    index = {t: i for i, t in enumerate(bounds)}
    # Difference array over the elementary segments: how many spans cover each one.
    cover = [0] * (len(bounds) + 1)
    for start, end, _ in spans:
        cover[index[start]] += 1
        cover[index[end]] -= 1
    share, open_count = [], 0
    for i in range(len(bounds) - 1):
        open_count += cover[i]
        share.append((bounds[i + 1] - bounds[i]) / open_count if open_count else 0.0)
    prefix = [0.0]
    for x in share:
        prefix.append(prefix[-1] + x)
    return [(name, (prefix[index[end]] - prefix[index[start]]) / 1e9) for start, end, name in spans]


def op_table(
    events: list[tuple[str, float]], hlo_text: str, steps: int
) -> tuple[list[dict], list[dict]]:
    """Per-op and per-kind rows (seconds per step, share, calls, GFLOP/s), largest first."""
    instructions, computations = parse_hlo(hlo_text)
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for name, s in events:
        seconds[name] += s
        calls[name] += 1
    total = sum(seconds.values()) or 1.0
    rows, kinds = [], collections.defaultdict(lambda: {"seconds": 0.0, "flops": 0.0, "ops": 0})
    for name, s in seconds.items():
        flops = op_flops(name, instructions, computations) * calls[name] / steps
        kind = op_kind(name, instructions, flops)
        ins = instructions.get(name)
        rows.append(
            {
                "op": name,
                "kind": kind,
                "shape": ins.shape if ins else "",
                "source": ins.source if ins else "",
                "seconds_per_step": s / steps,
                "share": s / total,
                "calls_per_step": calls[name] / steps,
                "gflops": flops / (s / steps) / 1e9 if flops else None,
            }
        )
        k = kinds[kind]
        k["seconds"] += s / steps
        k["flops"] += flops
        k["ops"] += 1
    rows.sort(key=lambda r: -r["seconds_per_step"])
    kind_rows = [
        {
            "kind": kind,
            "seconds_per_step": v["seconds"],
            "share": v["seconds"] * steps / total,
            "ops": v["ops"],
            "gflops": v["flops"] / v["seconds"] / 1e9 if v["flops"] else None,
        }
        for kind, v in kinds.items()
    ]
    kind_rows.sort(key=lambda r: -r["seconds_per_step"])
    return rows, kind_rows


def markdown(rows: list[dict], kind_rows: list[dict], top: int) -> str:
    def gf(x):
        return f"{x:.0f}" if x else ""

    lines = [
        "| kind | s/step | share | ops | GFLOP/s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['kind']} | {r['seconds_per_step']:.3f} | {r['share']:.1%} | {r['ops']} "
            f"| {gf(r['gflops'])} |"
            for r in kind_rows
        ),
        "",
        "| op | kind | source | shape | calls/step | s/step | share | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['op']} | {r['kind']} | {r['source']} | `{r['shape'][:60]}` "
            f"| {r['calls_per_step']:.0f} "
            f"| {r['seconds_per_step']:.3f} | {r['share']:.1%} | {gf(r['gflops'])} |"
            for r in rows[:top]
        ),
    ]
    return "\n".join(lines)


def decode_program(config, batch: int, prompt_len: int, new_tokens: int):
    """``(run, compiled, compile_s)`` for ``jaxalign.sampling.generate``'s program on random
    weights of ``config``'s shape: ``batch`` prompts of ``prompt_len`` tokens, ``new_tokens``
    sampled at temperature 0.7 per row (no EOS, so every row decodes all of them)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxalign import sampling
    from jaxalign.models.llama import Transformer

    model = Transformer(config, rngs=nnx.Rngs(0))
    sampling_config = sampling.SamplingConfig(
        max_new_tokens=new_tokens, temperature=0.7, top_p=1.0, eos_token_ids=()
    )
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_len))
    ids, mask = jax.numpy.asarray(ids, "int32"), jax.numpy.ones((batch, prompt_len), bool)
    graphdef, state = nnx.split(model)
    program = sampling._compiled(graphdef, sampling_config)
    key = jax.random.key(0)
    t = time.perf_counter()
    compiled = program.lower(state, ids, mask, key).compile()
    compile_s = time.perf_counter() - t

    def run():
        jax.block_until_ready(compiled(state, ids, mask, key))

    return run, compiled, compile_s


def spa_program(config, pairs: int, length: int, chunk: int):
    """``(run, compiled, compile_s)`` for SPA's refinement step (``jaxalign.refinement``:
    the reference's log-probs computed in the step, the extrapolated logits, DPO loss with
    self-refined labels) on random weights of ``config``'s shape, with the demo round's
    sizes: ``pairs`` pairs of ``length``-token rows, prompts of 30–60 tokens, responses of
    20–64, padded on the right."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxalign import parallel, refinement, training
    from jaxalign.models.llama import Transformer

    rng = np.random.default_rng(0)
    batch = {"weight": np.ones(pairs, np.float32), "smoothing": np.zeros(pairs, np.float32)}
    prompt_lens = rng.integers(30, 61, pairs)
    for side in ("chosen", "rejected"):
        ids, attention, scored = (np.zeros((pairs, length), np.int32) for _ in range(3))
        for i, p in enumerate(prompt_lens):
            end = min(length, p + int(rng.integers(20, 65)))
            ids[i, :end] = rng.integers(3, config.vocab_size, end)
            attention[i, :end] = 1
            scored[i, p:end] = 1
        batch |= {f"{side}_ids": ids, f"{side}_attention_mask": attention}
        batch[f"{side}_loss_mask"] = scored
    train_config = training.TrainConfig(logp_chunk_size=chunk, batch_size=pairs)
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, state, shardings = training.create_train_state(
        Transformer(config, rngs=nnx.Rngs(0)),
        train_config,
        1000,
        mesh,
        algo_state=refinement.init_margin_buffer(64),
    )
    _, reference = nnx.split(Transformer(config, rngs=nnx.Rngs(1)))
    reference_shardings = parallel.model_shardings(reference, mesh)
    reference = parallel.place_params(reference, mesh)
    loss_fn = refinement.spa_loss_fn(
        graphdef, beta=0.1, lam=0.5, quantile=0.1, alpha=0.1, flag_after_step=0, chunk_size=chunk
    )
    step = training.make_train_step(
        graphdef,
        train_config,
        mesh,
        loss_fn,
        shardings,
        total_steps=1000,
        frozen_shardings=reference_shardings,
    )
    device_batch = parallel.make_global_batch(batch, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, device_batch, reference).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], device_batch, reference)
        return jax.block_until_ready(metrics)

    return run, compiled, compile_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--program",
        choices=("train", "spa", "decode"),
        default="train",
        help="the DPO train step; SPA's refinement step (on-the-fly reference, extrapolated "
        "logits; demo-sized rows, use --length 128); or sampling (decode.py's generate: "
        "prompts of --length tokens, --new-tokens each, no early stop)",
    )
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="decode: prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode: tokens per row")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64, help="log-prob chunk size (positions)")
    parser.add_argument("--steps", type=int, default=2, help="steps traced (after 2 untimed)")
    parser.add_argument("--top", type=int, default=25, help="ops in the table")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a quick look)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # as train_step.py
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()

    import jax
    from machine import cpu_description
    from train_step import build_jax_step, matmul_params, model_flops, synthetic_pairs

    from jaxalign.models.llama import ModelConfig

    config = ModelConfig(tie_embeddings=True)
    if args.layers:
        config = config.replace(num_layers=args.layers)
    if args.program == "decode":
        run, compiled, compile_s = decode_program(config, args.batch, args.length, args.new_tokens)
        flops = 2 * matmul_params(config) * args.batch * args.new_tokens
    elif args.program == "spa":
        run, compiled, compile_s = spa_program(config, args.pairs, args.length, args.chunk)
        # the policy's forward and backward and the reference's forward, every position
        flops = model_flops(config, 2 * args.pairs, args.length) * 8 / 6
    else:
        batch = synthetic_pairs(args.pairs, args.length, config.vocab_size)
        step, state, device_batch, compiled, compile_s = build_jax_step(config, batch, args.chunk)
        holder = {"state": state}
        flops = model_flops(config, 2 * args.pairs, args.length)

        def run():
            holder["state"], metrics = step(holder["state"], device_batch)
            jax.block_until_ready((holder["state"], metrics))

    times = []
    for _ in range(2):
        run()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
        events = profile_events(trace_dir)
    rows, kind_rows = op_table(events, compiled.as_text(), args.steps)
    step_s = statistics.median(times)
    print(markdown(rows, kind_rows, args.top), file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": f"profile_{args.program}",
                "pairs": args.pairs if args.program != "decode" else None,
                "batch": args.batch if args.program == "decode" else None,
                "new_tokens": args.new_tokens if args.program == "decode" else None,
                "length": args.length,
                "layers": config.num_layers,
                "logp_chunk_size": args.chunk,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "step_s": round(step_s, 3),
                "compile_s": round(compile_s, 1),
                "model_gflops_per_step": round(flops / 1e9, 1),
                "tokens_per_s": round(args.batch * args.new_tokens / step_s, 1)
                if args.program == "decode"
                else None,
                "model_gflops_per_s": round(flops / step_s / 1e9, 1),
                "op_seconds_per_step": round(sum(r["seconds_per_step"] for r in rows), 3),
                "kinds": [
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in kind_rows
                ],
                "top_ops": [
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows[: args.top]
                ],
                "cpu": cpu_description(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
