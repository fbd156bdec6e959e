"""Decode throughput: jaxalign ``generate`` vs transformers (torch) ``generate``.

Same model (SmolLM2-135M-Instruct, float32, converted once by ``jaxalign.models.load``),
same left-padded prompts (batch 16, about 64 tokens), 128 new tokens, sampling at
temperature 0.7 with top-p 1.0, and no early stop on either side (no EOS for jaxalign,
``min_new_tokens`` for transformers), so both decode exactly 128 tokens per row.
Prints one JSON line; compile time is reported apart from the timed runs.

    python benchmarks/decode.py [--batch 16] [--prompt-len 64] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from machine import cpu_description

from jaxalign import sampling
from jaxalign.loading import EMBEDDED, default_cache_dir, load
from jaxalign.sampling import SamplingConfig, generate

SETTLE_S = 3.0  # pause before each timed run

TOPICS = [
    "the history of the printing press",
    "how vaccines train the immune system",
    "why the sky is blue",
    "the rules of chess for a beginner",
    "how to bake sourdough bread",
    "the water cycle",
    "what a compiler does",
    "the causes of the French Revolution",
    "how bees communicate",
    "the difference between weather and climate",
    "how a bicycle stays upright",
    "the basics of photosynthesis",
    "how interest rates affect inflation",
    "the life cycle of a star",
    "why people dream",
    "how to learn a new language",
]


def make_prompts(tokenizer, batch: int, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded chat prompts of ``prompt_len - 8 .. prompt_len`` tokens: ``[B, prompt_len]``."""
    ids = np.full((batch, prompt_len), tokenizer.pad_token_id, np.int64)
    mask = np.zeros((batch, prompt_len), np.int64)
    for i in range(batch):
        topic = TOPICS[i % len(TOPICS)]
        text = f"Explain {topic} in plain words. " * 8 + "Now give a short summary."
        tokens = tokenizer.encode_prompt(text)
        length = prompt_len - (i % 9)
        tokens = tokens[:length] if len(tokens) >= length else tokens
        ids[i, prompt_len - len(tokens) :] = tokens
        mask[i, prompt_len - len(tokens) :] = 1
    return ids, mask


def jaxalign_runner(model, ids, mask, new_tokens: int):
    """A function decoding the batch once (blocking) for a seed."""
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.7, top_p=1.0)
    mask = mask.astype(bool)

    def run(seed: int) -> None:
        out = generate(model, ids, mask, jax.random.key(seed), config)
        jax.block_until_ready(out)
        assert int(np.min(np.asarray(out.lengths))) == new_tokens

    return run


def torch_runner(folder, ids, mask, new_tokens: int):
    """transformers ``generate`` with the same settings, decoding all ``new_tokens``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    kwargs = dict(
        do_sample=True,
        temperature=0.7,
        top_p=1.0,
        top_k=0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=int(ids[0, 0]),
    )

    def run(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(ids_t, attention_mask=mask_t, **kwargs)
        assert out.shape[1] == ids.shape[1] + new_tokens

    return run


def timed(run, seed: int) -> float:
    start = time.perf_counter()
    run(seed)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    model_name = "smollm2-135m-instruct"
    model, tokenizer = load(model_name)
    folder = default_cache_dir() / EMBEDDED[model_name].name
    ids, mask = make_prompts(tokenizer, args.batch, args.prompt_len)
    tokens = args.batch * args.new_tokens
    runners = {"jaxalign": jaxalign_runner(model, ids, mask, args.new_tokens)}
    if not args.skip_torch:
        runners["torch"] = torch_runner(folder, ids, mask, args.new_tokens)
    first = {name: timed(run, 0) for name, run in runners.items()}  # compile / warm-up
    # Alternate the two so that load from other processes hits both alike, with a short
    # pause before each run so that one framework's threads and freed memory settle
    # before the other is timed.
    times = {name: [] for name in runners}
    for seed in range(1, args.repeats + 1):
        for name, run in runners.items():
            time.sleep(SETTLE_S)
            times[name].append(timed(run, seed))
    best = {name: min(t) for name, t in times.items()}
    result = {
        "benchmark": "decode",
        "model": model_name,
        "dtype": "float32",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "cpu_cores": os.cpu_count(),
        "cpu": cpu_description(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "jaxalign_tokens_per_s": round(tokens / best["jaxalign"], 1),
        "jaxalign_compile_s": round(first["jaxalign"] - best["jaxalign"], 2),
        "jaxalign_traces": sampling.trace_count(),
        "jaxalign_runs_s": [round(t, 2) for t in times["jaxalign"]],
    }
    if "torch" in runners:
        result["torch_tokens_per_s"] = round(tokens / best["torch"], 1)
        result["torch_runs_s"] = [round(t, 2) for t in times["torch"]]
        result["ratio"] = round(best["torch"] / best["jaxalign"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
