"""Decode throughput: jaxalign ``generate`` vs transformers (torch) ``generate``.

Same model (SmolLM2-135M-Instruct, float32, converted once by ``jaxalign.models.load``),
same left-padded prompts (batch 16, about 64 tokens), 128 new tokens, sampling at
temperature 0.7 with top-p 1.0, and no early stop on either side (no EOS for jaxalign,
``min_new_tokens`` for transformers), so both decode exactly 128 tokens per row.
Prints one JSON line; compile time is reported apart from the timed runs.

    python benchmarks/decode.py [--batch 16] [--prompt-len 64] [--new-tokens 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from jaxalign import sampling
from jaxalign.models.registry import EMBEDDED, default_cache_dir, load
from jaxalign.sampling import SamplingConfig, generate

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


def time_jaxalign(model, ids, mask, new_tokens: int, repeats: int) -> dict:
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.7, top_p=1.0)
    start = time.perf_counter()
    jax.block_until_ready(generate(model, ids, mask.astype(bool), jax.random.key(0), config))
    first = time.perf_counter() - start
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        out = generate(model, ids, mask.astype(bool), jax.random.key(seed), config)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    assert int(np.min(np.asarray(out.lengths))) == new_tokens
    best = min(times)
    return {
        "tokens_per_s": ids.shape[0] * new_tokens / best,
        "seconds": best,
        "compile_s": first - best,
        "traces": sampling.trace_count(),
    }


def time_torch(folder, ids, mask, new_tokens: int, repeats: int) -> dict:
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
    times = []
    with torch.inference_mode():
        model.generate(ids_t, attention_mask=mask_t, max_new_tokens=4, do_sample=False)  # warm-up
        for seed in range(repeats):
            torch.manual_seed(seed)
            start = time.perf_counter()
            out = model.generate(ids_t, attention_mask=mask_t, **kwargs)
            times.append(time.perf_counter() - start)
    assert out.shape[1] == ids.shape[1] + new_tokens
    best = min(times)
    return {"tokens_per_s": ids.shape[0] * new_tokens / best, "seconds": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    name = "smollm2-135m-instruct"
    model, tokenizer = load(name)
    folder = default_cache_dir() / EMBEDDED[name].name
    ids, mask = make_prompts(tokenizer, args.batch, args.prompt_len)
    ours = time_jaxalign(model, ids, mask, args.new_tokens, args.repeats)
    result = {
        "benchmark": "decode",
        "model": name,
        "dtype": "float32",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "cpu_cores": os.cpu_count(),
        "jaxalign_tokens_per_s": round(ours["tokens_per_s"], 1),
        "jaxalign_compile_s": round(ours["compile_s"], 2),
        "jaxalign_traces": ours["traces"],
    }
    if not args.skip_torch:
        theirs = time_torch(folder, ids, mask, args.new_tokens, args.repeats)
        result["torch_tokens_per_s"] = round(theirs["tokens_per_s"], 1)
        result["ratio"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
