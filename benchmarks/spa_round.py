"""Wall-clock split of one SPA demo round, and the same round done in torch as a peer.

    python benchmarks/spa_round.py [--prompts 48] [--no-peer] [--torch-threads N] [key=value ...]

Runs round 0 (seed DPO) and one self-annotated round of the demo config in a fresh
run directory, then reads each stage's time from the run's ``state.json``. Prints
one JSON line: seconds per stage of round 1, each stage's share, and the slowest.
Compile time is included in each stage's first use (the sampler, the judge's
forward pass and the train step compile once per shape bucket); ``round_1_compiles`` gives
each stage's compiles, their seconds and how many came from the persistent compilation
cache under ``~/.cache/jaxalign/xla``. The first run on a machine compiles everything; a
second run reads the programs back. ``run.compile_cache=false`` as an override times the
round cold whatever the cache holds; ``JAXALIGN_COMPILE_CACHE=DIR`` with an empty ``DIR``
gives a cold run, then a warm one when repeated.

**The torch peer** (left out with ``--no-peer``) then runs round 1 again the way the SPA
authors' code does it on one machine (:mod:`torch_spa`), from the same ``π_0`` (jaxalign's
round-0 model, exported as a Hugging Face folder) and the same ``π_init`` (the config's
model; the embedded SmolLM2 GGUF loaded by transformers), on the same encoded prompts, with
the same lengths, batch sizes, β, λ, margin window, learning rate and schedule, in float32:
transformers ``generate`` samples, forward passes under ``π_0`` and ``π_init`` judge, and a
hand-written torch loop trains with SPA's refinement loss. Each side runs in a worker
process of its own, one after the other (jaxalign first: it makes ``π_0``). The JSON line
then also has ``seconds`` (sample, judge, train, total) of both sides,
``ratio_torch_over_jaxalign`` per stage and in total (above 1: jaxalign is faster), and
sampled tokens per second on both sides (tokens up to and including each response's EOS).
The sides' samples differ (two random number generators), so their pair counts and
response lengths may too; both are reported, with each side's train steps (jaxalign groups
pairs by length bucket and fills each bucket's last batch with weight-0 pairs; the peer
shuffles them and pads each batch to its longest row, as Hugging Face's collators do).
jaxalign's judge, by default (``spa.judge_from_sampler``), takes ``log π_{i-1}`` from its
sampler and runs only ``π_init``; the peer runs both forward passes, as the authors' code
does. jaxalign's stage times include compiling; the peer's exclude loading its models.
``round_1_judge_scoring`` has the judge's forward passes (sequences, tokens, the padding
computed, and ``warm_mfu``, their share of the peak over the calls that compiled nothing);
``round_1_train_perf`` the refinement steps' ``perf/mfu`` as logged (model FLOPs of the
policy's forward and backward and the on-the-fly reference's forward, attention included,
over wall time between steps, against the peak ``jaxalign.throughput`` uses).
``load_avg_1m`` is the machine's load before the run: torch's threads slow down many-fold
when another process holds a core (see ``--torch-threads``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

# jaxalign is imported inside the functions that use it: the torch worker process imports
# this module too (multiprocessing's spawn re-imports the main script), and must not load JAX.

STAGES = ("sample", "judge", "train")
COMPILE_FIELDS = ("compiles", "compile_seconds", "compile_cache_hits")


def jaxalign_round(prompts: int, overrides: list[str], peer: bool = False) -> dict:
    """Runs rounds 0 and 1 of SPA on the demo config with ``overrides``; returns the old
    fields of this benchmark's JSON. With ``peer``, also what the torch peer needs: ``π_0``
    exported to a Hugging Face folder, ``π_init``'s source, round 1's encoded prompts, the
    tokenizer's end and padding ids, and :class:`torch_spa.PeerSettings` fields."""
    from jaxalign.algorithms import spa
    from jaxalign.cli.run import DEMO_CONFIG
    from jaxalign.config import load_config

    out = pathlib.Path(tempfile.mkdtemp(prefix="spa_round_")) / "run"
    config = load_config(
        DEMO_CONFIG,
        [
            "spa.rounds=1",
            f"spa.prompts_per_round=[{prompts}]",
            "run.progress=false",
            f"run.output_dir={out}",
            *overrides,
        ],
    )
    start = time.perf_counter()
    spa.run(config, log=lambda m: print(m, file=sys.stderr))
    total = time.perf_counter() - start
    stages = json.loads((out / "state.json").read_text())["stages"]
    train = stages["round_1/train"]
    ckpt = train["result"]["checkpoint_seconds"]
    split = {
        "sample": stages["round_1/sample"]["seconds"],
        "judge": stages["round_1/judge"]["seconds"],
        "train": train["seconds"] - ckpt,
        "checkpoint": ckpt,
        "eval": stages.get("round_1/eval", {}).get("seconds", 0.0),
    }
    round_total = sum(split.values())
    result = {
        "benchmark": "spa_round",
        "prompts": prompts,
        "pairs": stages["round_1/judge"]["result"]["count/kept"],
        "round_1_seconds": split,
        "round_1_share": {k: round(v / round_total, 3) for k, v in split.items()},
        "slowest_stage": max(split, key=split.get),
        "round_0_train_seconds": stages["round_0/train"]["seconds"],
        "total_seconds": round(total, 1),
        # kept vs decoded tokens and their rates; the warm rate (batches that compiled
        # nothing) is the one to set beside benchmarks/decode.py
        "round_1_decoding": stages["round_1/sample"].get("decoding", {}),
        # programs each stage compiled, their seconds (inside the stage's seconds above) and
        # how many came back from the persistent compilation cache (run.compile_cache)
        "round_1_compiles": {
            k: {f: stages[f"round_1/{k}"].get(f, 0) for f in COMPILE_FIELDS} for k in STAGES
        },
        # the judge's forward passes: sequences and tokens scored, padding computed, and the
        # share of the peak over the calls that compiled nothing (jaxalign.throughput)
        "round_1_judge_scoring": stages["round_1/judge"].get("scoring", {}),
        # the refinement steps' logged throughput (model FLOPs: policy forward and backward
        # plus the on-the-fly reference's forward, attention included)
        "round_1_train_perf": train_perf(out / "metrics.jsonl", "round_1/train"),
    }
    if peer:
        candidates_path = stages["round_1/sample"]["result"]["candidates"]
        candidates = [json.loads(line) for line in open(candidates_path) if line.strip()]
        result["peer_inputs"] = {
            **_peer_models(config, out),
            "prompt_ids": [c["prompt_ids"] for c in candidates],
            "sample_tokens": sum(x["num_tokens"] for c in candidates for x in c["responses"]),
            "train_steps": train["result"]["steps"],
            "judge_from_sampler": config.spa.judge_from_sampler,
            "settings": peer_settings(config),
        }
    return result


def train_perf(metrics_path: pathlib.Path, tag: str) -> dict:
    """The ``perf/*`` metrics of ``tag``'s steps in ``metrics.jsonl``: each step's MFU and
    seconds, and over all steps the model FLOPs per second of wall time and its share of
    the peak (the first step's seconds include compiling its program; ``*_after_first``
    leave it out). Empty when no step logged them."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    rows = [r for r in rows if r.get("tag") == tag and "perf/step_seconds" in r]
    if not rows:
        return {}
    seconds = [r["perf/step_seconds"] for r in rows]
    tflop = [r["perf/model_tflops_per_second"] * r["perf/step_seconds"] for r in rows]
    out = {"step_seconds": [round(x, 2) for x in seconds]}
    if all("perf/mfu" in r for r in rows):
        out["step_mfu"] = [round(r["perf/mfu"], 3) for r in rows]
        peak = rows[0]["perf/model_tflops_per_second"] / rows[0]["perf/mfu"]
        out["peak_tflops_per_second"] = round(peak, 4)
        out["mfu"] = round(sum(tflop) / sum(seconds) / peak, 3)
        if len(rows) > 1:
            out["mfu_after_first"] = round(sum(tflop[1:]) / sum(seconds[1:]) / peak, 3)
    return out


def _peer_models(config, run_dir: pathlib.Path) -> dict:
    """``π_0`` of the run exported as a Hugging Face folder, ``π_init``'s source as
    ``(folder, gguf_file or None)`` for transformers, and the tokenizer's special ids."""
    from jaxalign.loading import EMBEDDED, installed_gguf
    from jaxalign.models import load
    from jaxalign.weights import export_hf

    model, tokenizer = load(run_dir / "round_0")
    folder = run_dir.parent / "pi_0_hf"
    export_hf(model, folder, tokenizer)
    name = config.model.name
    if name in EMBEDDED:
        path = installed_gguf(EMBEDDED[name])
        if path is None:
            raise FileNotFoundError(
                f"the torch peer loads {name} from its GGUF, whose package is not installed: "
                f"{EMBEDDED[name].install_command}"
            )
        init = (str(path.parent), path.name)
    elif pathlib.Path(name).suffix == ".gguf":
        init = (str(pathlib.Path(name).parent), pathlib.Path(name).name)
    elif (pathlib.Path(name) / "config.json").is_file():
        init = (name, None)
    else:
        raise ValueError(
            f"model.name={name!r}: the torch peer loads a registered name, a .gguf file or a "
            "Hugging Face folder; pass one of those, or run with --no-peer"
        )
    return {
        "init_source": init,
        "policy_folder": str(folder),
        "eos_ids": list(tokenizer.eos_token_ids),
        "pad_id": int(tokenizer.pad_token_id),
    }


def peer_settings(config) -> dict:
    """The fields of :class:`torch_spa.PeerSettings` for round 1 of ``config``."""
    train, spa = config.train, config.spa
    return {
        "samples_per_prompt": spa.samples_per_prompt,
        "temperature": config.sampling.temperature,
        "top_p": config.sampling.top_p,
        "top_k": config.sampling.top_k,
        "max_new_tokens": config.sampling.max_new_tokens,
        "generate_batch_size": config.run.generate_batch_size,
        "max_response_tokens": config.data.max_response_tokens,
        "judge_reward": spa.judge_reward,
        "beta": train.beta,
        "lam": spa.lambda_for_round(1),
        "margin_window": spa.margin_window,
        "noise_quantile": spa.noise_quantile,
        "smoothing_alpha": spa.smoothing_alpha,
        "flag_warmup_ratio": spa.flag_warmup_ratio,
        "batch_size": train.batch_size,
        "epochs": spa.round_epochs,
        "learning_rate": train.learning_rate,
        "warmup_ratio": train.warmup_ratio,
        "schedule": train.schedule,
        "adam_b1": train.adam_b1,
        "adam_b2": train.adam_b2,
        "adam_eps": train.adam_eps,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": config.run.seed * 1000 + 1,
    }


def torch_round(inputs: dict) -> dict:
    """The torch peer's round 1 on jaxalign's ``peer_inputs`` (:func:`torch_spa.run_round`)."""
    import torch_spa

    return torch_spa.run_round(
        tuple(inputs["init_source"]),
        inputs["policy_folder"],
        inputs["prompt_ids"],
        inputs["eos_ids"],
        inputs["pad_id"],
        inputs["settings"],
        inputs.get("threads"),
    )


def in_worker(fn, *args):
    """``fn(*args)`` in a fresh process of its own (spawned, so that it starts with no
    framework loaded), which exits when it returns; errors are raised here."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def peer_fields(ours: dict, inputs: dict, theirs: dict) -> dict:
    """The side-by-side fields: seconds per stage, ratios torch / jaxalign, tokens/s."""
    split = ours["round_1_seconds"]
    seconds = {
        "jaxalign": {k: split[k] for k in STAGES},
        "torch": {k: theirs["seconds"][k] for k in STAGES},
    }
    for side in seconds.values():
        side["total"] = sum(side.values())
    tokens = {"jaxalign": inputs["sample_tokens"], "torch": theirs["sample_tokens"]}
    return {
        "peer": "transformers generate + forward passes + hand-written torch SPA loop (float32)",
        "seconds": {s: {k: round(v, 3) for k, v in t.items()} for s, t in seconds.items()},
        "ratio_torch_over_jaxalign": {
            k: round(seconds["torch"][k] / seconds["jaxalign"][k], 3) for k in (*STAGES, "total")
        },
        "sample_tokens": tokens,
        "sample_tokens_per_s": {
            s: round(tokens[s] / seconds[s]["sample"], 1) for s in ("jaxalign", "torch")
        },
        "round_1_pairs": {"jaxalign": ours["pairs"], "torch": theirs["pairs"]},
        "round_1_train_steps": {"jaxalign": inputs["train_steps"], "torch": theirs["train_steps"]},
        # jaxalign's judge reads log π_{i-1} from its sampler when it can (one forward pass,
        # π_init's); the peer runs both passes.
        "jaxalign_judge_from_sampler": inputs["judge_from_sampler"],
        "jaxalign_seconds_include_compile": True,
        "torch_flagged_pairs": theirs.get("train_flagged", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument(
        "--no-peer", action="store_true", help="time jaxalign only, in this process (no torch)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch's intra-op threads in the peer (default: one per core). On a machine "
        "another job keeps busy, torch's OpenMP threads wait for each other: measured on 2 "
        "cores with another job on ~1.5 of them, 8 rows x 16 tokens of generate took 25-36 s "
        "with 2 threads and 2.2 s with 1",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.no_peer:
        print(json.dumps(jaxalign_round(args.prompts, args.overrides)))
        return
    load = os.getloadavg()[0]  # before our own work: what else keeps the machine busy
    ours = in_worker(jaxalign_round, args.prompts, args.overrides, True)
    inputs = ours.pop("peer_inputs")
    theirs = in_worker(torch_round, {**inputs, "threads": args.torch_threads})
    extra = {"torch_threads": theirs["torch_threads"], "load_avg_1m": round(load, 2)}
    print(json.dumps({**ours, **peer_fields(ours, inputs, theirs), **extra}))


if __name__ == "__main__":
    main()
