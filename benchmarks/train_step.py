"""DPO train-step throughput: jaxalign's jitted step vs TRL's DPOTrainer (torch), one run.

Both sides train the same model shape (SmolLM2-135M: 30 layers, hidden 576, 9/3
heads, vocab 49152, tied embeddings; random weights) in float32 on the same
batch shape (8 pairs, 256 tokens: 64 prompt + 192 response), with reference
log-probs precomputed (TRL: ``precompute_ref_log_probs=True``), AdamW, and
gradient clipping. TRL comes with the ``bench`` extra (``pip install -e ".[bench]"``);
without it the benchmark stops with that command. ``--peer torch`` times an equivalent
hand-written torch DPO step instead (and the JSON says so); by default that step is timed
too, as a second peer.

Each framework runs in a worker process of its own (built one after the other, then
timed in turns, one step at a time), so their allocators and thread pools never share
a process. Both workers start with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc
malloc backs large blocks with transparent huge pages; ``--small-pages`` turns it off),
since both frameworks allocate gigabytes of fresh activation buffers every step.

MFU: the step's model FLOPs are counted as ``6·N·tokens + 12·L·T²·D·sequences`` (the
attention term counts full, unmasked score matrices, as computed). The peak is the best
float32 matmul this machine does, measured in the same run by both frameworks (a 2048³
matmul, best of 10: jitted in XLA, ``torch.matmul`` in the torch worker); ``mfu`` is
against the higher of the two, ``mfu_vs_xla_peak`` against XLA's own. torch's bfloat16
matmul (AMX on CPUs that have it) is reported for reference, not used. XLA's own cost
analysis of the compiled step is reported alongside.

    python benchmarks/train_step.py [--steps 5] [--pairs 8] [--length 256]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from machine import cpu_description  # noqa: E402

from jaxalign import parallel, throughput, training  # noqa: E402
from jaxalign.models.llama import ModelConfig, Transformer  # noqa: E402

PROMPT_FRACTION = 0.25


def torch_matmul_peaks(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Best-of-``repeats`` FLOP/s of ``torch.matmul`` on ``n x n`` float32 and bfloat16."""
    import torch

    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.ones((n, n), dtype=dtype)
        b = torch.ones((n, n), dtype=dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t)
        peaks[name] = 2 * n**3 / best
    return peaks


INSTALL_HINT = 'pip install -e ".[bench]"'


def synthetic_pairs(pairs: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length pairs: ``length·PROMPT_FRACTION`` prompt tokens (shared), the rest response."""
    rng = np.random.default_rng(seed)
    prompt_len = int(length * PROMPT_FRACTION)
    prompt = rng.integers(3, vocab, (pairs, prompt_len))
    batch = {}
    for side in ("chosen", "rejected"):
        response = rng.integers(3, vocab, (pairs, length - prompt_len))
        batch[f"{side}_ids"] = np.concatenate([prompt, response], 1).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((pairs, length), np.int32)
        loss = np.ones((pairs, length), np.int32)
        loss[:, :prompt_len] = 0
        batch[f"{side}_loss_mask"] = loss
    batch["weight"] = np.ones(pairs, np.float32)
    batch["smoothing"] = np.zeros(pairs, np.float32)
    return batch


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in matmuls: the layers plus the output projection."""
    d, f, h, k, dh = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.dim_per_head,
    )
    per_layer = d * h * dh * 2 + d * k * dh * 2 + 3 * d * f
    return config.num_layers * per_layer + d * config.vocab_size


def model_flops(config: ModelConfig, sequences: int, length: int) -> float:
    """``6·N·tokens`` plus attention ``12·L·T²·(H·Dh)`` per sequence (forward + backward)."""
    tokens = sequences * length
    attention = 12 * config.num_layers * length**2 * config.num_heads * config.dim_per_head
    return 6 * matmul_params(config) * tokens + attention * sequences


def build_jax_step(config: ModelConfig, batch: dict, chunk: int):
    """jaxalign's jitted DPO step on ``batch`` (reference log-probs precomputed), compiled:
    ``(step, state, device_batch, compiled, compile_s)``."""
    train_config = training.TrainConfig(logp_chunk_size=chunk, batch_size=len(batch["weight"]))
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, state, shardings = training.create_train_state(model, train_config, 1000, mesh)
    ref = training.compute_reference_logps(graphdef, state.params, batch, chunk_size=chunk)
    batch = {**batch, **{k: np.asarray(v) for k, v in ref.items()}}
    step = training.make_train_step(
        graphdef,
        train_config,
        mesh,
        training.dpo_loss_fn(train_config),
        shardings,
        total_steps=1000,
    )
    device_batch = parallel.make_global_batch(batch, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    return step, state, device_batch, compiled, time.perf_counter() - t


def jax_stepper(config: ModelConfig, batch: dict, chunk: int):
    """``(run_one_step, info)`` for jaxalign's jitted DPO step (compiled here)."""
    step, state, device_batch, compiled, compile_s = build_jax_step(config, batch, chunk)
    info = {"compile_s": compile_s}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    info["xla_flops"] = float(cost.get("flops", float("nan")))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready((holder["state"], metrics))
        info["loss"] = float(metrics["train/loss"])

    return run, info


def _torch_model(config: ModelConfig):
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(**config.to_hf_config())
    hf.torch_dtype = "float32"
    return transformers.LlamaForCausalLM(hf).float()


def trl_stepper(config: ModelConfig, batch: dict):
    """TRL's DPOTrainer step on the batch: ``trainer.training_step`` (TRL's loss, forward and
    backward) then the Trainer loop's gradient clipping and AdamW step. Reference log-probs
    are precomputed by TRL itself (``precompute_ref_log_probs=True``)."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    prompt_len = int(batch["chosen_ids"].shape[1] * PROMPT_FRACTION)
    words = lambda ids: " ".join(f"w{i}" for i in ids)
    # One word per id; TRL appends EOS to each response, so responses drop their last id.
    rows = [
        {
            "prompt": words(batch["chosen_ids"][i, :prompt_len]),
            "chosen": " " + words(batch["chosen_ids"][i, prompt_len:-1]),
            "rejected": " " + words(batch["rejected_ids"][i, prompt_len:-1]),
        }
        for i in range(len(batch["weight"]))
    ]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(config.vocab_size), pad_token="<pad>", eos_token="</s>"
    )
    out = tempfile.mkdtemp()
    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=len(rows),
        learning_rate=5e-7,
        beta=0.1,
        max_length=None,
        precompute_ref_log_probs=True,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=_torch_model(config),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.create_optimizer()
    inputs = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop

    def run():
        trainer.training_step(model, inputs)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return run, {"peer": "trl.DPOTrainer (training_step + clip + AdamW)"}


def _word_tokenizer(vocab: int):
    """A word-level tokenizer with ``vocab`` ids (TRL wants a tokenizer; ids come pre-made)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "</s>": 1, "<s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def torch_stepper(config: ModelConfig, batch: dict):
    """A hand-written torch DPO step as TRL runs it: chosen+rejected concatenated in one forward,
    precomputed reference log-probs, sigmoid loss, backward, grad clipping, AdamW."""
    import torch
    import torch.nn.functional as F

    model = _torch_model(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0)
    ids = torch.from_numpy(np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])).long()
    attn = torch.from_numpy(
        np.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    )
    mask = torch.from_numpy(
        np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    ).float()
    b = len(batch["weight"])

    def logps():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        picked = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
        return (picked * mask[:, 1:]).sum(-1)

    with torch.no_grad():
        ref = logps()

    def run():
        lp = logps()
        delta = (lp[:b] - ref[:b]) - (lp[b:] - ref[b:])
        loss = -F.logsigmoid(0.1 * delta).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run, {"peer": "hand-written torch DPO step"}


def _serve(kind: str, config: ModelConfig, batch: dict, chunk: int, conn) -> None:
    """Worker process: builds one stepper, reports its info, then times one step per request."""
    try:
        if kind == "jaxalign":
            run, info = jax_stepper(config, batch, chunk)
            info["peak"] = throughput.measure_cpu_matmul_peak(repeats=10)
        else:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            run, info = (trl_stepper if kind == "trl" else torch_stepper)(config, batch)
            info["torch_peaks"] = torch_matmul_peaks()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which picks a fallback
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", info))
    while conn.recv() == "step":
        t = time.perf_counter()
        run()
        conn.send((time.perf_counter() - t, info.get("loss")))


class Worker:
    """One framework's stepper in its own process.

    Each framework runs in a process of its own so that their allocators, thread pools
    and freed-but-kept memory do not meet: measured in one process, a jaxalign step
    run after TRL steps took 15-40% longer than before them, and returning freed heap
    to the OS (``malloc_trim``) removed most of the gap."""

    def __init__(self, kind: str, config: ModelConfig, batch: dict, chunk: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(kind, config, batch, chunk, child))
        self.process.start()
        status, self.info = self.conn.recv()
        if status != "ready":
            self.close()
            raise RuntimeError(self.info)

    def __call__(self) -> float:
        self.conn.send("step")
        seconds, loss = self.conn.recv()
        self.info["loss"] = loss
        return seconds

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send("stop")
        self.process.join()


def interleaved_times(steppers: dict, steps: int) -> dict[str, float]:
    """Median seconds per step of each stepper (a callable returning its step's seconds).

    The steppers take turns, so that load from other processes on the machine falls
    on all of them alike; in each turn a stepper runs one untimed step, then the timed
    one. The untimed step is needed on VMs that hand freed guest memory back to the
    host: measured here, a jaxalign step started after 30 s idle spent 10 s in the
    kernel re-populating its buffers, against 1.6 s when run right after another step
    (and training runs its steps back to back)."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, run in steppers.items():
            run()
            times[name].append(run())
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument(
        "--peer",
        choices=("trl", "torch"),
        default="trl",
        help="the peer the ratio is against: TRL's DPOTrainer (the bench extra) or the "
        "hand-written torch step",
    )
    parser.add_argument(
        "--skip-torch-step", action="store_true", help="time TRL only (saves one model's memory)"
    )
    parser.add_argument("--chunk", type=int, default=64, help="log-prob chunk size (positions)")
    parser.add_argument(
        "--small-pages",
        action="store_true",
        help="do not ask glibc malloc for transparent huge pages in the workers",
    )
    args = parser.parse_args()
    if not args.small_pages:
        # Both workers inherit it. Each step allocates gigabytes of fresh buffers; with
        # 4 KiB pages a jaxalign step took ~1.75M page faults (~4 s of system time).
        os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")

    config = ModelConfig(tie_embeddings=True)  # SmolLM2-135M's shape
    batch = synthetic_pairs(args.pairs, args.length, config.vocab_size)
    if args.peer == "trl":
        try:
            import trl  # noqa: F401
        except ImportError as e:
            sys.exit(
                f"train_step.py: TRL is not installed ({e}); install the benchmark peers with "
                f"`{INSTALL_HINT}`, or time the hand-written torch step with --peer torch"
            )
    # At most two workers live at once (each holds a model, its optimizer and a step's
    # activations: three did not fit in 24 GiB): jaxalign against the peer, then, for the
    # second ratio, against the hand-written torch step. Each ratio uses the jaxalign
    # times of its own turns.
    ours_worker = Worker("jaxalign", config, batch, args.chunk)
    infos, times, torch_times = {}, {}, {}
    try:
        if args.peer == "trl":
            try:
                trl_worker = Worker("trl", config, batch, args.chunk)
            except RuntimeError as e:
                sys.exit(
                    f"train_step.py: TRL's DPOTrainer could not be built ({e}); check the "
                    f"versions `{INSTALL_HINT}` pins, or time the hand-written torch step "
                    "with --peer torch"
                )
            try:
                times = interleaved_times({"jaxalign": ours_worker, "trl": trl_worker}, args.steps)
            finally:
                trl_worker.close()
            infos["trl"] = trl_worker.info
        if args.peer == "torch" or not args.skip_torch_step:
            torch_worker = Worker("torch", config, batch, args.chunk)
            try:
                torch_times = interleaved_times(
                    {"jaxalign": ours_worker, "torch": torch_worker}, args.steps
                )
            finally:
                torch_worker.close()
            infos["torch"] = torch_worker.info
    finally:
        ours_worker.close()
    infos["jaxalign"] = ours_worker.info
    if args.peer == "torch":
        times = torch_times
    xla_peak = infos["jaxalign"]["peak"]
    torch_peaks = next(infos[k]["torch_peaks"] for k in ("trl", "torch") if k in infos)
    peak = max(xla_peak, torch_peaks["float32"])
    ours = {"step_s": times["jaxalign"], **infos["jaxalign"]}
    peer_key = args.peer
    peer = {"step_s": times[peer_key], "peer": infos[peer_key]["peer"]}
    torch_step = {"step_s": torch_times.get("torch", float("nan"))}
    ours_vs_torch = torch_times.get("jaxalign", float("nan"))
    flops = model_flops(config, 2 * args.pairs, args.length)
    result = {
        "benchmark": "dpo_train_step",
        "model": "SmolLM2-135M shape, random weights, tied embeddings, float32",
        "pairs": args.pairs,
        "length": args.length,
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jaxalign_step_s": round(ours["step_s"], 4),
        "jaxalign_pairs_per_s": round(args.pairs / ours["step_s"], 3),
        "jaxalign_compile_s": round(ours["compile_s"], 1),
        "logp_chunk_size": args.chunk,
        "peer": peer["peer"],
        "peer_step_s": round(peer["step_s"], 4),
        "peer_pairs_per_s": round(args.pairs / peer["step_s"], 3),
        "ratio": round(peer["step_s"] / ours["step_s"], 3),
        "torch_step_s": round(torch_step["step_s"], 4),
        "ratio_vs_torch_step": round(torch_step["step_s"] / ours_vs_torch, 3),
        "jaxalign_step_s_in_torch_turns": round(ours_vs_torch, 4),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "xla_matmul_peak_gflops": round(xla_peak / 1e9, 1),
        "torch_matmul_peak_gflops": round(torch_peaks["float32"] / 1e9, 1),
        "torch_bf16_matmul_gflops": round(torch_peaks["bfloat16"] / 1e9, 1),
        "model_gflops_per_step": round(flops / 1e9, 1),
        "xla_gflops_per_step": round(ours["xla_flops"] / 1e9, 1),
        "mfu": round(flops / ours["step_s"] / peak, 3),
        "mfu_vs_xla_peak": round(flops / ours["step_s"] / xla_peak, 3),
        "cpu": cpu_description(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "goals": {"ratio": 1.5, "mfu": 0.5},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
