"""DPO on a pair file: a killed run resumes to the same result, the reference log-prob cache,
and the host-share data path."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_pairs import TINY, CharTokenizer, tiny_batches

from jaxalign import checkpoint, parallel, training
from jaxalign.algorithms import dpo
from jaxalign.data.pairs import build_pair_batches
from jaxalign.models.llama import Transformer


def _batches():
    return tiny_batches(8)


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


@pytest.mark.parametrize("where", ["local", "gs"])
def test_reference_cache_is_keyed_by_record_index(tmp_path, monkeypatch, request, where):
    """The cache is reused, or recomputed for other rows; in a local run directory or a
    ``gs://`` one (gcsfs against an in-memory Cloud Storage server)."""
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    calls = []
    real = dpo.with_reference_logps
    monkeypatch.setattr(dpo, "with_reference_logps", lambda *a: calls.append(1) or real(*a))
    if where == "gs":
        bucket = request.getfixturevalue("gcs_bucket")
        cache = f"gs://bucket/run/{dpo.reference_cache_name()}"
    else:
        cache = tmp_path / dpo.reference_cache_name()
    first = dpo.reference_logps(graphdef, params, _batches(), cache, CONFIG, False)
    again = dpo.reference_logps(graphdef, params, _batches(), cache, CONFIG, False)
    assert len(calls) == 1
    if where == "gs":
        assert f"run/{dpo.reference_cache_name()}" in bucket.names()
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["ref_chosen_logps"], b["ref_chosen_logps"])
    # Same shapes, other records (e.g. another host's rows): recomputed, not misread.
    swapped = _batches()[::-1]
    dpo.reference_logps(graphdef, params, swapped, cache, CONFIG, False)
    assert len(calls) == 2
    assert dpo.reference_cache_name() == "reference_logps.npz"
    assert dpo.reference_cache_name(host_local=True) == "reference_logps.process0-of-1.npz"


def test_host_share_path_on_one_process_is_the_single_host_path(tmp_path):
    """``read_host_pairs`` + ``host_pair_batches`` with one process: today's batches exactly."""
    from jaxalign.config import load_config
    from jaxalign.data.records import read_preference_records

    lines = [
        json.dumps({"prompt": f"question {i}?" * (i % 4 + 1), "chosen": "yes", "rejected": "no"})
        for i in range(21)
    ]
    lines[5] = "{broken"
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = load_config(
        None,
        ["train.batch_size=4", "data.max_prompt_tokens=32", "data.max_response_tokens=8"],
    )
    mesh = parallel.make_mesh(2, 2, 2)
    records, indices, report = dpo.read_host_pairs(str(path), mesh, 4, "skip")
    single, single_report = read_preference_records(str(path), "skip")
    assert records == single and report.to_dict() == single_report.to_dict()
    assert list(indices) == list(range(len(single)))
    got, got_report = dpo.host_pair_batches(records, indices, CharTokenizer(), config, mesh)
    want, want_report = build_pair_batches(
        single, CharTokenizer(), batch_size=4, max_prompt_tokens=32, max_response_tokens=8
    )
    assert got_report == want_report and len(got) == len(want) > 1
    for a, b in zip(got, want, strict=True):
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_reference_log_probs_use_the_training_compute_dtype(tmp_path):
    """With train.compute_dtype=bfloat16 the policy computes in bfloat16; the reference pass
    must too, so at step 1 (policy = reference) every margin is 0 and the loss log 2."""
    import dataclasses
    import math

    config = dataclasses.replace(CONFIG, epochs=1, compute_dtype="bfloat16")
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    dpo.train_dpo(model, _batches(), config, mesh, tmp_path, progress=False, log=lambda m: None)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert abs(first["rewards/margin"]) < 1e-6, first
    assert math.isclose(first["train/loss"], math.log(2), rel_tol=1e-6)
