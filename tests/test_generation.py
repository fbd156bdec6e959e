"""Tests for jaxalign.generation: bucketing and compile reuse, padding, stop strings,
prompt errors, the resumable JSONL driver, and greedy parity with transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sampling, throughput
from jaxalign.data.buckets import bucket_length
from jaxalign.data.records import DataError
from jaxalign.generation import (
    GenerationStats,
    generate_file,
    read_done_ids,
    sample_texts,
)
from jaxalign.models import ModelConfig, Transformer
from jaxalign.sampling import SamplingConfig

PAD, EOS = 0, 1


class CharTokenizer:
    """Printable ASCII, one id per character: id = ord(c) - 30; 0 pads, 1 ends."""

    eos_token_ids = (EOS,)
    pad_token_id = PAD

    def encode_prompt(self, prompt, use_chat_template=True):
        if isinstance(prompt, list):
            prompt = "\n".join(m["content"] for m in prompt)
        return [ord(c) - 30 for c in prompt if 32 <= ord(c) < 127]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 30) for i in ids if i > EOS)


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=128,
        initializer_range=0.3,
    )
    return Transformer(config, rngs=nnx.Rngs(1))


def greedy_reference(model, ids, steps, width=32):
    """Greedy continuation by repeated uncached full forward passes. The sequence is
    right-padded to ``width`` so one jitted program serves every step; causal
    attention keeps the padding out of the real positions."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, seq: nnx.merge(graphdef, state)(seq)[0])
    seq = list(ids)
    out = []
    for _ in range(steps):
        padded = jnp.asarray([seq + [PAD] * (width - len(seq))], jnp.int32)
        token = int(np.argmax(np.asarray(forward(state, padded)[0, len(seq) - 1])))
        out.append(token)
        if token == EOS:
            break
        seq.append(token)
    return out


PROMPTS = ["hello there", "a", "what is 2 + 2?", "tell me a story", "xyz"]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 24, 32, 48, 128]


def test_greedy_matches_reference_and_compiles_once_per_bucket(model, tokenizer):
    config = SamplingConfig(max_new_tokens=6, greedy=True)
    stats = GenerationStats()
    before = sampling.trace_count()
    results = sample_texts(
        model, tokenizer, PROMPTS, config, seed=0, batch_size=2, progress=False, stats=stats
    )
    # 5 prompts of <= 16 tokens: 3 batches (the last padded with a dummy row), 1 compile.
    assert sampling.trace_count() - before == 1 and stats.compiles == 1
    assert stats.samples == 5
    for prompt, (completion,) in zip(PROMPTS, results, strict=True):
        expected = greedy_reference(model, tokenizer.encode_prompt(prompt), 6)
        assert completion.token_ids == expected
        assert completion.text == tokenizer.decode(expected)
        assert completion.finished == (expected[-1] == EOS)
        assert completion.truncated == (not completion.finished)

    # A longer prompt lands in the 32 bucket: exactly one more compile.
    longer = PROMPTS + ["this prompt is longer than sixteen characters"]
    stats = GenerationStats()
    sample_texts(
        model, tokenizer, longer, config, seed=0, batch_size=2, progress=False, stats=stats
    )
    assert stats.compiles == 1  # the 16 bucket is reused, the 32 bucket is new


def test_n_samples_per_prompt(model, tokenizer):
    config = SamplingConfig(max_new_tokens=8, temperature=2.0, n=3)
    results = sample_texts(model, tokenizer, PROMPTS[:2], config, seed=3, progress=False)
    assert [len(r) for r in results] == [3, 3]
    again = sample_texts(model, tokenizer, PROMPTS[:2], config, seed=3, progress=False)
    assert [[c.token_ids for c in r] for r in results] == [[c.token_ids for c in r] for r in again]


def test_stats_count_kept_and_decoded_tokens(model, tokenizer):
    """Kept tokens are the responses' own; decoded tokens are every row of a batch (its
    padding rows too) times the batch's longest response, as the decode loop runs."""
    config = SamplingConfig(max_new_tokens=8, temperature=2.0, n=3)
    stats = GenerationStats()
    before = throughput.decoding_stats()
    results = sample_texts(
        model, tokenizer, PROMPTS[:3], config, seed=5, batch_size=2, progress=False, stats=stats
    )
    lengths = [[len(c.token_ids) for c in r] for r in results]
    assert len({n for row in lengths for n in row}) > 1, "the fixture should vary lengths"
    # One bucket: batches [0, 1] and [2 + a padding row that repeats prompt 2], 6 rows each.
    assert stats.tokens == sum(map(sum, lengths))
    assert stats.decoded_tokens == 6 * max(lengths[0] + lengths[1]) + 6 * max(lengths[2])
    done = throughput.decoding_since(before)
    assert done["sampled_tokens"] == stats.tokens
    assert done["decoded_tokens"] == stats.decoded_tokens
    assert done["decoded_tokens_per_second"] == pytest.approx(
        stats.decoded_tokens / stats.seconds, rel=1e-2
    )
    # A batch that compiled its program (only the first can) does not count as warm.
    first = 6 * max(lengths[0] + lengths[1])
    assert stats.compiles in (0, 1)
    assert done["warm_decoded_tokens"] == stats.decoded_tokens - first * stats.compiles
    assert throughput.decoding_since(throughput.decoding_stats()) == {}


def test_stop_strings_cut_text_and_mark_finished(model, tokenizer):
    config = SamplingConfig(max_new_tokens=12, greedy=True, eos_token_ids=(96,))
    (free,) = sample_texts(model, tokenizer, ["hello there"], config, seed=0, progress=False)[0]
    assert len(free.text) >= 8, "the fixture model should produce printable text"
    stop = free.text[4:6]
    where = free.text.find(stop)
    stats = GenerationStats()
    (cut,) = sample_texts(
        model,
        tokenizer,
        ["hello there"],
        config,
        seed=0,
        progress=False,
        stop_strings=["@@", stop],
        stats=stats,
    )[0]
    assert cut.text == free.text[:where]
    # Kept tokens are the cut response's; the decode ran on as far as the uncut one.
    assert stats.tokens == len(cut.token_ids) < len(free.token_ids)
    assert stats.decoded_tokens == 16 * len(free.token_ids)  # default batch: 16 rows
    assert cut.finished and not cut.truncated
    assert cut.token_ids == free.token_ids[: where + len(stop)]  # one char per token


def test_prompt_errors_name_the_prompt(model, tokenizer):
    config = SamplingConfig(max_new_tokens=8, greedy=True)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample_texts(model, tokenizer, ["ok", "   "], config, seed=0, progress=False)
    with pytest.raises(ValueError, match="prompt 2 has 130 tokens"):
        sample_texts(model, tokenizer, ["ok", "fine", "x" * 130], config, seed=0, progress=False)


# ---------------------------------------------------------------------------
# The JSONL driver.


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generate_file_resumes_after_a_kill(model, tokenizer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    records = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    records.append({"prompt": [{"role": "user", "content": "no id here"}]})
    write_jsonl(prompts, records)
    out = tmp_path / "out" / "samples.jsonl"
    config = SamplingConfig(max_new_tokens=5, greedy=True)
    summary = generate_file(model, tokenizer, prompts, out, config, seed=0, batch_size=2,
                            progress=False)  # fmt: skip
    assert summary == {"written": 6, "skipped": 0, "total": 6}
    full = read_jsonl(out)
    assert [r["id"] for r in full] == [f"q{i}" for i in range(5)] + ["prompts-6"]
    first = full[0]["responses"][0]
    assert set(first) == {"text", "finished", "truncated", "num_tokens"}
    assert full[5]["prompt"] == [{"role": "user", "content": "no id here"}]

    # Simulate a kill in the middle of writing the 4th line.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    summary = generate_file(model, tokenizer, prompts, out, config, seed=0, batch_size=2,
                            progress=False)  # fmt: skip
    assert summary == {"written": 3, "skipped": 3, "total": 6}
    resumed = read_jsonl(out)
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in full)
    assert resumed[:3] == full[:3]
    by_id = {r["id"]: r for r in full}
    for record in resumed[3:]:  # greedy: the redone prompts give the same answers
        assert record == by_id[record["id"]]

    # Nothing left: a third run writes nothing.
    summary = generate_file(model, tokenizer, prompts, out, config, seed=0, progress=False)
    assert summary["written"] == 0 and len(read_jsonl(out)) == 6


def test_sampled_output_is_the_same_after_a_kill_and_with_other_batch_sizes(
    model, tokenizer, tmp_path
):
    """Each prompt's randomness is keyed by its id, so a resumed run (here with another batch
    size) writes the same bytes as an uninterrupted one."""
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS * 2)])
    config = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2)
    full = tmp_path / "full.jsonl"
    generate_file(model, tokenizer, prompts, full, config, seed=3, batch_size=2, progress=False)
    killed = tmp_path / "killed.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    killed.write_text("".join(lines[:4]) + lines[4][:7])  # cut inside the 5th line
    generate_file(model, tokenizer, prompts, killed, config, seed=3, batch_size=3, progress=False)
    assert killed.read_bytes() == full.read_bytes()
    texts = {r["id"]: [x["text"] for x in r["responses"]] for r in read_jsonl(full)}
    assert len({t for group in texts.values() for t in group}) > len(texts)  # really sampled
    other_seed = tmp_path / "other.jsonl"
    generate_file(model, tokenizer, prompts, other_seed, config, seed=4, progress=False)
    assert other_seed.read_bytes() != full.read_bytes()


def test_samples_depend_on_the_prompt_identity_not_on_its_batch(model, tokenizer):
    config = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2)
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    ordered = sample_texts(model, tokenizer, PROMPTS, config, seed=5, batch_size=4,
                           progress=False, identities=ids)  # fmt: skip
    order = [3, 0, 4, 2, 1]
    shuffled = sample_texts(
        model, tokenizer, [PROMPTS[i] for i in order], config,
        seed=5, batch_size=1, progress=False, identities=[ids[i] for i in order],
    )  # fmt: skip
    for k, i in enumerate(order):
        assert [c.token_ids for c in shuffled[k]] == [c.token_ids for c in ordered[i]]
    # Other identities, other samples.
    renamed = sample_texts(
        model, tokenizer, PROMPTS, config,
        seed=5, batch_size=4, progress=False, identities=[f"x{i}" for i in range(len(PROMPTS))],
    )  # fmt: skip
    assert [[c.token_ids for c in g] for g in renamed] != [
        [c.token_ids for c in g] for g in ordered
    ]


def test_damaged_output_before_the_last_line_is_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(DataError, match=r"out.jsonl:2"):
        read_done_ids(out)
    out.write_text('{"id": "a"}\n{"id": "b", "respo')
    assert read_done_ids(out) == {'"a"'}
    assert out.read_text() == '{"id": "a"}\n'


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "fine"}', '{"prompt": "broken"'], r"prompts.jsonl:2: field '<line>'"),
        (['{"id": 1, "question": "no prompt"}'], r"prompts.jsonl:1: field 'prompt'"),
        (['{"prompt": 5}'], r"prompts.jsonl:1: field 'prompt'"),
        (['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}'], "id 1 appears twice"),
    ],
)
def test_bad_input_names_file_line_and_field(model, tokenizer, tmp_path, lines, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    config = SamplingConfig(max_new_tokens=2, greedy=True)
    with pytest.raises(DataError, match=message):
        generate_file(model, tokenizer, prompts, tmp_path / "o.jsonl", config, seed=0,
                      progress=False)  # fmt: skip


# ---------------------------------------------------------------------------
# Greedy parity with transformers on the embedded SmolLM2-135M-Instruct.

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to cook.",
    [{"role": "user", "content": "How many legs does a spider have?"}],
    "Explain what a prime number is.",
]


def torch_greedy(folder, token_lists, new_tokens, eos_ids):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode():
        for ids in token_lists:  # one prompt at a time: no padding on the reference side
            out = hf.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=new_tokens,
                eos_token_id=list(eos_ids),
                pad_token_id=eos_ids[0],
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


def smollm2_parity(num_prompts, new_tokens):
    from jaxalign.loading import EMBEDDED, default_cache_dir, load

    name = "smollm2-135m-instruct"
    try:
        model, tokenizer = load(name)
    except RuntimeError as e:  # no package and no network
        pytest.skip(f"embedded model unavailable: {e}")
    prompts = CHAT_PROMPTS[:num_prompts]
    config = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    ours = sample_texts(model, tokenizer, prompts, config, seed=0, batch_size=8, progress=False)
    eos = tokenizer.eos_token_ids
    expected = torch_greedy(
        default_cache_dir() / EMBEDDED[name].name,
        [tokenizer.encode_prompt(p) for p in prompts],
        new_tokens,
        eos,
    )
    for (completion,), reference in zip(ours, expected, strict=True):
        assert completion.token_ids == reference
        assert completion.text == tokenizer.decode(reference)


def test_greedy_matches_transformers_smollm2_short():
    smollm2_parity(num_prompts=2, new_tokens=32)


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2_full():
    smollm2_parity(num_prompts=5, new_tokens=64)


# ---------------------------------------------------------------------------
# The `jaxalign generate` command.


def test_cli_generate_writes_and_resumes(tmp_path, capsys):
    from jaxalign.cli import main

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": 7, "prompt": "Say hi."}, {"id": 8, "prompt": "Count to 3."}])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--prompts", str(prompts), "--out", str(out), "--n", "2"]
    argv += ["--max-new-tokens", "4", "--no-progress", "--stop", "zzz"]
    assert main(argv) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [7, 8]
    assert all(len(r["responses"]) == 2 for r in records)
    assert all(1 <= x["num_tokens"] <= 4 for r in records for x in r["responses"])
    assert main(argv) == 0
    assert "wrote 0 prompts, skipped 2" in capsys.readouterr().out
    assert len(read_jsonl(out)) == 2


def test_cli_generate_rejects_bad_settings(tmp_path, capsys):
    from jaxalign.cli import main

    argv = ["generate", "--prompts", str(tmp_path / "missing.jsonl"), "--out", "x.jsonl"]
    assert main(argv + ["--temperature", "-1"]) == 2
    assert "argument --temperature: must be a finite number > 0" in capsys.readouterr().err
    assert main(argv + ["--max-new-tokens", "2"]) == 1
    assert "missing.jsonl not found" in capsys.readouterr().err
