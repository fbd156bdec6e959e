"""Text in, text out: the shell around :mod:`jaxalign.sampling`.

``sample_texts`` tokenises prompts (chat template applied), groups them by length
bucket (``jaxalign.data.buckets``, at least 16 tokens) so a whole run compiles one decode
program per bucket, pads the last batch of a bucket with dummy rows (discarded),
decodes, applies stop strings and shows a progress bar in samples/s.

``generate_file`` drives it from a JSONL prompt file to a JSONL output that is
appended one batch at a time (flush + fsync). Rerunning the same command skips
the ids already written; a half-written last line left by a kill is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import parallel, sampling, throughput
from jaxalign.data.buckets import bucket_length
from jaxalign.data.records import DataError, read_prompt_records
from jaxalign.models.llama import Transformer
from jaxalign.sampling import SamplingConfig
from jaxalign.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[dict]


@dataclasses.dataclass
class Completion:
    """One sampled response."""

    text: str  # decoded, special tokens skipped, cut before the first stop string
    token_ids: list[int]  # generated ids, EOS included when produced
    finished: bool  # an EOS token or a stop string ended it
    truncated: bool  # hit max_new_tokens without finishing
    # With SamplingConfig.return_logprobs: log π(token) of each of ``token_ids`` under the
    # unmodified model (before temperature and filters), as a forward pass would give it.
    logprobs: list[float] | None = None


@dataclasses.dataclass
class GenerationStats:
    """What a run cost; ``compile_seconds`` is the wall time of the batches that
    traced a new program (compile plus that batch's own decoding)."""

    samples: int = 0
    seconds: float = 0.0
    compiles: int = 0
    compile_seconds: float = 0.0
    tokens: int = 0  # response tokens kept, up to and including each EOS
    decoded_tokens: int = 0  # batch rows x decode steps: the work done

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def prompt_key(root: jax.Array, identity) -> jax.Array:
    """The PRNG key of one prompt: ``root`` folded with a 64-bit hash of ``identity`` (a
    prompt id, a record index, or a tuple of them; anything JSON can write). The same
    identity gets the same key in any batch, bucket, resume or host."""
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=8).digest()
    high, low = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    return jax.random.fold_in(jax.random.fold_in(root, high), low)


def encode_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    max_prompt_len: int,
    *,
    use_chat_template: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[list[int]]:
    """Token ids of each prompt; an empty or too long prompt is an error naming its index.

    ``use_chat_template`` and ``max_prompt_tokens`` (keep the last that many tokens) encode a
    prompt exactly as :mod:`jaxalign.data.pairs` does for judging and training, so a response
    is trained under the prompt it was sampled from.
    """
    encoded = []
    for i, prompt in enumerate(prompts):
        if (isinstance(prompt, str) and not prompt.strip()) or (
            isinstance(prompt, list) and not prompt
        ):
            raise ValueError(f"prompt {i} is empty; remove it or give it some text")
        ids = tokenizer.encode_prompt(prompt, use_chat_template=use_chat_template)
        if max_prompt_tokens is not None:
            ids = ids[max(len(ids) - max_prompt_tokens, 0) :]
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens; give it some text")
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, more than the {max_prompt_len} that fit in "
                "the model's context next to max_new_tokens; shorten it or lower max_new_tokens"
            )
        encoded.append(ids)
    return encoded


def pad_left(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """``[B, width]`` int32 ids and bool mask, each row right-aligned."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = True
    return ids, mask


def cut_at_stop(
    tokenizer: Tokenizer, token_ids: list[int], stop_strings: Sequence[str]
) -> tuple[str, list[int], bool]:
    """``(text, token_ids, stopped)``: the text cut before the earliest stop string,
    and the shortest prefix of ``token_ids`` whose text contains it."""
    text = tokenizer.decode(token_ids)
    hits = [(text.find(s), s) for s in stop_strings if s and s in text]
    if not hits:
        return text, token_ids, False
    where, stop = min(hits)
    # Decoded prefixes only grow, so "contains the stop string" is monotonic in length.
    low, high = 1, len(token_ids)
    while low < high:
        mid = (low + high) // 2
        if stop in tokenizer.decode(token_ids[:mid]):
            high = mid
        else:
            low = mid + 1
    return text[:where], token_ids[:low], True


def _plan_batches(lengths: Sequence[int], batch_size: int, max_bucket: int) -> list[list[int]]:
    """Prompt indices grouped by bucket, then cut into batches of at most ``batch_size``."""
    by_bucket: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_bucket.setdefault(min(bucket_length(length), max_bucket), []).append(i)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


def iter_sample_batches(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig,
    *,
    seed: int,
    batch_size: int = 16,
    mesh: Mesh | None = None,
    progress: bool = True,
    stop_strings: Sequence[str] = (),
    stats: GenerationStats | None = None,
    identities: Sequence | None = None,
    use_chat_template: bool = True,
    max_prompt_tokens: int | None = None,
) -> Iterator[tuple[list[int], list[list[Completion]]]]:
    """Yields ``(prompt indices, their completions)`` one decoded batch at a time.

    Prompt ``i`` samples with :func:`prompt_key` ``(key(seed), identities[i])`` (default
    identity: its index ``i``), so its responses are the same whatever batch, bucket,
    resume point or host it is decoded in; pass stable ids (record ids) as ``identities``
    when the prompt list may change between runs. When ``config.eos_token_ids`` is empty,
    the tokenizer's EOS and end-of-turn ids are used. ``use_chat_template`` and
    ``max_prompt_tokens``: see :func:`encode_prompts`.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not config.eos_token_ids:
        config = config.replace(eos_token_ids=tuple(tokenizer.eos_token_ids))
    context = model.config.max_position_embeddings
    max_prompt_len = context - config.max_new_tokens
    if max_prompt_len < 1:
        raise ValueError(
            f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {context} tokens"
        )
    encoded = encode_prompts(
        tokenizer,
        prompts,
        max_prompt_len,
        use_chat_template=use_chat_template,
        max_prompt_tokens=max_prompt_tokens,
    )
    if identities is None:
        identities = range(len(prompts))
    elif len(identities) != len(prompts):
        raise ValueError(f"{len(identities)} identities for {len(prompts)} prompts")
    batches = _plan_batches([len(e) for e in encoded], batch_size, max_prompt_len)
    stats = stats if stats is not None else GenerationStats()
    root = jax.random.key(seed)
    keys = [prompt_key(root, identity) for identity in identities]
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, parallel.place_params(state, mesh))  # once, not per batch
    bar = tqdm(total=len(prompts) * config.n, unit="sample", disable=not progress, desc="sampling")
    try:
        for members in batches:
            rows = [encoded[i] for i in members]
            width = min(bucket_length(max(len(r) for r in rows)), max_prompt_len)
            dummies = batch_size - len(rows)  # rows that fill the batch, discarded below
            rows += [rows[-1]] * dummies
            ids, mask = pad_left(rows, width, tokenizer.pad_token_id)
            batch_keys = jnp.stack([keys[i] for i in members] + [keys[members[-1]]] * dummies)
            traces = sampling.trace_count()
            start = time.perf_counter()
            out = sampling.generate(model, ids, mask, batch_keys, config, mesh=mesh)
            tokens, lengths, finished = (
                parallel.to_host(x) for x in (out.tokens, out.lengths, out.finished)
            )
            logprobs = None if out.logprobs is None else parallel.to_host(out.logprobs)
            elapsed = time.perf_counter() - start
            stats.seconds += elapsed
            compiled = sampling.trace_count() > traces
            if compiled:
                stats.compiles += 1
                stats.compile_seconds += elapsed
            completions = []
            for j in range(len(members)):
                group = []
                for r in range(j * config.n, (j + 1) * config.n):
                    ids_r = tokens[r, : lengths[r]].tolist()
                    text, ids_r, stopped = cut_at_stop(tokenizer, ids_r, stop_strings)
                    done = bool(finished[r]) or stopped
                    lp = None if logprobs is None else logprobs[r, : len(ids_r)].tolist()
                    group.append(Completion(text, ids_r, done, not done, lp))
                completions.append(group)
            # Kept: the responses as returned (a stop string cuts them); decoded: the rows
            # stepped, padding rows too, over the steps the batch ran (fewer once it shrank).
            kept = sum(len(c.token_ids) for group in completions for c in group)
            decoded = int(parallel.to_host(out.row_steps))
            stats.tokens += kept
            stats.decoded_tokens += decoded
            throughput.record_decoding(kept, decoded, elapsed, compiled=compiled)
            stats.samples += len(members) * config.n
            bar.update(len(members) * config.n)
            yield members, completions
    finally:
        bar.close()
    logger.info(
        "sampled %d responses in %.1f s (%.2f samples/s, %.0f tokens/s kept of %d decoded); "
        "%d compiles took %.1f s",
        stats.samples,
        stats.seconds,
        stats.samples_per_second,
        stats.tokens_per_second,
        stats.decoded_tokens,
        stats.compiles,
        stats.compile_seconds,
    )


def sample_texts(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig,
    *,
    seed: int,
    batch_size: int = 16,
    mesh: Mesh | None = None,
    progress: bool = True,
    stop_strings: Sequence[str] = (),
    stats: GenerationStats | None = None,
    identities: Sequence | None = None,
    use_chat_template: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[list[Completion]]:
    """``config.n`` completions for each prompt (a string, or chat messages), in order.

    Pass a :class:`GenerationStats` as ``stats`` to read the compile count and times.
    ``identities`` (e.g. record ids) key each prompt's randomness; see
    :func:`iter_sample_batches`.
    """
    results: list[list[Completion] | None] = [None] * len(prompts)
    for members, completions in iter_sample_batches(
        model,
        tokenizer,
        prompts,
        config,
        seed=seed,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
        stop_strings=stop_strings,
        stats=stats,
        identities=identities,
        use_chat_template=use_chat_template,
        max_prompt_tokens=max_prompt_tokens,
    ):
        for i, group in zip(members, completions, strict=True):
            results[i] = group
    return results


# ---------------------------------------------------------------------------
# Resumable JSONL output.


def _id_key(value) -> str:
    return json.dumps(value, sort_keys=True)


def read_done_ids(out_path: Path) -> set[str]:
    """Ids already written to ``out_path``. A last line cut short by a kill (no newline,
    or not JSON) is removed from the file; damage anywhere else is an error."""
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    done = set()
    keep_bytes = len(data) - len(tail)
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            done.add(_id_key(record["id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            if lineno == len(lines) and not tail:
                keep_bytes = len(data) - len(raw) - 1
                logger.warning("%s:%d: dropping a partial last record", out_path, lineno)
                break
            raise DataError(
                f"{out_path}:{lineno}: not a complete output record with an 'id' ({e}); the "
                "file is damaged before its last line: move it away and rerun"
            ) from None
    if keep_bytes != len(data):
        if tail:
            logger.warning("%s: dropping a partial last line", out_path)
        with open(out_path, "r+b") as f:
            f.truncate(keep_bytes)
            f.flush()
            os.fsync(f.fileno())
    return done


def generate_file(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts_path: str | Path,
    out_path: str | Path,
    config: SamplingConfig,
    seed: int,
    batch_size: int = 16,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
    stop_strings: Sequence[str] = (),
    on_bad_record: str = "error",
    stats: GenerationStats | None = None,
) -> dict:
    """Samples responses for every ``{prompt, id?}`` record of a JSONL file.

    Writes one line per prompt to ``out_path``:
    ``{id, prompt, responses: [{text, finished, truncated, num_tokens}]}``, appended
    and fsynced per batch. Ids already in ``out_path`` are skipped, so rerunning after
    a kill finishes the job. A record without ``id`` gets ``<file stem>-<line>``.
    Returns ``{"written", "skipped", "total"}``.
    """
    records, _ = read_prompt_records(str(prompts_path), on_bad_record=on_bad_record)
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        key = _id_key(record["id"])
        if key in seen:
            raise DataError(
                f"{prompts_path}: id {record['id']!r} appears twice (records {seen[key] + 1} "
                f"and {i + 1}); ids must be unique so a rerun can skip finished prompts"
            )
        seen[key] = i
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done_ids(out_path)
    todo = [r for r in records if _id_key(r["id"]) not in done]
    if done:
        logger.info("%s: %d prompts already done, %d to go", out_path, len(done), len(todo))
    written = 0
    with open(out_path, "a", encoding="utf-8") as f:
        for members, completions in iter_sample_batches(
            model,
            tokenizer,
            [r["prompt"] for r in todo],
            config,
            seed=seed,
            batch_size=batch_size,
            mesh=mesh,
            progress=progress,
            stop_strings=stop_strings,
            stats=stats,
            identities=[r["id"] for r in todo],
        ):
            for i, group in zip(members, completions, strict=True):
                record = {
                    "id": todo[i]["id"],
                    "prompt": todo[i]["prompt"],
                    "responses": [
                        {
                            "text": c.text,
                            "finished": c.finished,
                            "truncated": c.truncated,
                            "num_tokens": len(c.token_ids),
                        }
                        for c in group
                    ],
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            written += len(members)
    return {"written": written, "skipped": len(records) - len(todo), "total": len(records)}
