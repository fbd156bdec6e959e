"""``jaxalign dpo``'s training loop: a killed run resumes to the same result."""

import json

import jax
import numpy as np
from flax import nnx

from jaxalign import checkpoint, parallel, training
from jaxalign.algorithms import dpo as train_loop
from jaxalign.cli import dpo
from jaxalign.data.pairs import build_pair_batches
from jaxalign.models.llama import ModelConfig, Transformer

TINY = ModelConfig(
    vocab_size=128, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
)


class CharTokenizer:
    pad_token_id = 0

    def encode_prompt(self, prompt, use_chat_template=True):
        return [1] + [ord(c) % 128 for c in prompt]

    def encode_response(self, text, add_eos=True):
        return [ord(c) % 128 for c in text] + ([2] if add_eos else [])


def _batches():
    records = [
        {"prompt": f"question {i}?", "chosen": "yes " * (i % 3 + 1), "rejected": "no"}
        for i in range(8)
    ]
    batches, _ = build_pair_batches(
        records, CharTokenizer(), batch_size=4, max_prompt_tokens=16, max_response_tokens=16
    )
    return batches


CONFIG = training.TrainConfig(learning_rate=1e-3, epochs=3, batch_size=4, logp_chunk_size=8)


def _train(out, **kw):
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    return dpo.train_dpo(
        model, _batches(), CONFIG, mesh, out, progress=False, log=lambda m: None, **kw
    )


def test_resumed_run_matches_uninterrupted(tmp_path):
    whole, last = _train(tmp_path / "whole", save_every=2)
    assert np.isfinite(last["train/loss"])
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, CONFIG.epochs * len(_batches()) + 1))

    # "Kill" after step 2 by keeping only the first checkpoint, then rerun.
    part = tmp_path / "part"
    _train(part, save_every=2)
    ckpt = checkpoint.Checkpointer(part / "checkpoints", async_=False)
    for s in ckpt.all_steps():
        if s > 2:
            ckpt._manager.delete(s)
    ckpt.close()
    resumed, _ = _train(part, save_every=2)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    saved = checkpoint.load_params(part / "model", whole)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = train_loop.epoch_order(0, 1, 10)
    np.testing.assert_array_equal(a, train_loop.epoch_order(0, 1, 10))
    assert sorted(a) == list(range(10))
    assert not np.array_equal(a, train_loop.epoch_order(0, 2, 10))
