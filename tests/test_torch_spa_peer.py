"""The torch peer of benchmarks/spa_round.py (benchmarks/torch_spa.py) computes what jaxalign
computes: SPA's refinement loss, its flags and margin window, and the judge's log-probs, on
the same weights and tokens (jaxalign's own code as the independent reference)."""

import copy
import json
import os
import pathlib
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign import refinement, scoring, training  # noqa: E402
from jaxalign.models import load  # noqa: E402
from jaxalign.weights import load_hf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import torch_spa  # noqa: E402
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def policy_and_reference(tiny_model_dir, tmp_path_factory):
    """The tiny model as π_ref and a perturbed copy as π_θ, each in torch and in jaxalign
    (the perturbed weights go from torch to jaxalign through a saved folder)."""
    reference = torch_spa.load_causal_lm(str(tiny_model_dir))
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("policy")
    policy.save_pretrained(folder, safe_serialization=True)
    return {
        "torch": (policy, reference),
        "jaxalign": (load_hf(folder), load_hf(tiny_model_dir)),
    }


def random_pair_batch(rng, pairs: int, width: int, vocab: int) -> dict[str, np.ndarray]:
    """Right-padded pairs (the pair-batch layout): a shared prompt of 3-6 tokens, responses
    of 2-9 tokens, ``loss_mask`` on the responses."""
    batch = {"weight": np.ones(pairs, np.float32), "smoothing": np.zeros(pairs, np.float32)}
    prompts = [rng.integers(3, vocab, rng.integers(3, 7)).tolist() for _ in range(pairs)]
    for side in ("chosen", "rejected"):
        ids = np.zeros((pairs, width), np.int32)
        attention = np.zeros((pairs, width), np.int32)
        loss = np.zeros((pairs, width), np.int32)
        for i, prompt in enumerate(prompts):
            response = rng.integers(3, vocab, rng.integers(2, 10)).tolist()
            n, m = len(prompt), len(response)
            ids[i, : n + m] = prompt + response
            attention[i, : n + m] = 1
            loss[i, n : n + m] = 1
        batch |= {
            f"{side}_ids": ids,
            f"{side}_attention_mask": attention,
            f"{side}_loss_mask": loss,
        }
    return batch


def stacked_rows(batch: dict, name: str):
    """``[2B, T]`` torch rows: the chosen rows of field ``name``, then the rejected ones."""
    rows = np.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]])
    return torch.from_numpy(rows).long()


def test_refinement_loss_flags_window_and_gradient_match_jaxalign(policy_and_reference):
    """Three batches through both SPA losses: a window of 5 margins that wraps, the median as
    threshold (so some pairs are flagged and some not), flagging from step 1, a weight-0
    pair in the last batch. Loss, margins, flags, the window's margins and the gradient of
    the loss (global norm, final and first-layer norm weights, tied embedding) agree."""
    beta, lam, alpha, q, window_size, flag_after = 0.1, 0.5, 0.1, 0.5, 5, 1
    policy, reference = policy_and_reference["torch"]
    ours, ours_ref = policy_and_reference["jaxalign"]
    loss_fn = refinement.spa_loss_fn(
        None,
        beta=beta,
        lam=lam,
        quantile=q,
        alpha=alpha,
        flag_after_step=flag_after,
        chunk_size=8,
    )

    @nnx.jit  # one compile for the three batches (same shapes)
    def loss_and_grads(model, batch, buffer, step, reference):
        def objective(model):
            return loss_fn(model, batch, buffer, step, None, frozen=reference)

        return nnx.value_and_grad(objective, has_aux=True)(model)

    buffer = refinement.init_margin_buffer(window_size)
    window = torch_spa.MarginWindow(window_size)
    rng = np.random.default_rng(0)
    flagged = []
    for step in range(3):
        batch = random_pair_batch(rng, pairs=4, width=16, vocab=2000)
        padding = None
        if step == 2:
            # The pair of largest |margin| becomes padding, turned to its negative margin
            # (chosen and rejected swapped): below the threshold, yet never flagged.
            probe = {k: jnp.asarray(v) for k, v in batch.items()}
            (_, (aux, _)), _ = loss_and_grads(ours, probe, buffer, jnp.asarray(step), ours_ref)
            margins = np.asarray(aux["pairs/extrapolated_margin"])
            padding = int(np.argmax(np.abs(margins)))
            if margins[padding] > 0:
                for k in ("ids", "attention_mask", "loss_mask"):
                    c, r = batch[f"chosen_{k}"], batch[f"rejected_{k}"]
                    c[padding], r[padding] = r[padding].copy(), c[padding].copy()
            batch["weight"][padding] = 0.0
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        (want_loss, (aux, buffer)), want_grads = loss_and_grads(
            ours, b, buffer, jnp.asarray(step), ours_ref
        )

        ids, attention, loss_mask = (
            stacked_rows(batch, k) for k in ("ids", "attention_mask", "loss_mask")
        )
        policy.zero_grad(set_to_none=True)
        logits = policy(input_ids=ids, attention_mask=attention).logits
        with torch.no_grad():
            ref_logits = reference(input_ids=ids, attention_mask=attention).logits
        weight = torch.from_numpy(batch["weight"])
        threshold = window.threshold(q)
        loss, margin, z = torch_spa.spa_refinement_loss(
            logits,
            ref_logits,
            ids,
            loss_mask.float(),
            threshold=threshold,
            flagging=step >= flag_after,
            beta=beta,
            lam=lam,
            alpha=alpha,
            weight=weight,
        )
        loss.backward()
        window.push(margin[weight > 0].tolist())

        np.testing.assert_allclose(loss.item(), float(want_loss), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            margin.numpy(), np.asarray(aux["pairs/extrapolated_margin"]), rtol=0, atol=1e-5
        )
        np.testing.assert_array_equal(z.numpy(), np.asarray(aux["pairs/flagged"]))
        filled = np.asarray(buffer["margins"])[: int(buffer["count"])]
        np.testing.assert_allclose(sorted(window.values), sorted(filled), rtol=0, atol=1e-5)
        flagged.append(z.numpy())
        if padding is not None:
            assert margin[padding] < threshold and z[padding] == 0

        grads = dict(nnx.to_flat_state(want_grads))
        want_norm = np.sqrt(sum(float(np.sum(np.square(v[...]))) for v in grads.values()))
        norm = torch.sqrt(sum((p.grad**2).sum() for p in policy.parameters()))
        np.testing.assert_allclose(float(norm), want_norm, rtol=1e-4)
        pairs = (
            (policy.model.norm.weight, ("norm", "weight"), ...),
            (policy.model.embed_tokens.weight, ("embed_tokens",), ...),
            (
                policy.model.layers[0].input_layernorm.weight,
                ("layers", "input_layernorm", "weight"),
                0,
            ),
        )
        for param, path, index in pairs:
            np.testing.assert_allclose(
                param.grad.numpy(),
                np.asarray(grads[path][...])[index],
                rtol=1e-3,
                atol=1e-7 * want_norm,
            )
    assert not flagged[0].any()  # no flags before flag_after_step
    later = np.concatenate(flagged[1:])
    assert later.any() and not later.all()  # the threshold splits the later pairs
    assert len(window.values) == window_size  # the window filled and wrapped


def test_judge_log_probs_match_jaxalign_scoring(tiny_model_dir, policy_and_reference):
    """The peer judge's summed response log-probs under the tiny model equal
    jaxalign.scoring.response_logps on the same prompt and response ids (a finished
    response ends with its EOS, a cut one has none), and its rewards pick the pairs
    β·(log π − log π_init) says."""
    _, tokenizer = load(tiny_model_dir)
    eos = tokenizer.end_of_turn_id
    rng = np.random.default_rng(1)
    prompts = [tokenizer.encode_prompt(t) for t in ("Name a colour.", "What is 2+2?", "Hi")]
    responses = [
        (rng.integers(3, 5000, 4).tolist() + [eos], True),
        (rng.integers(3, 5000, 11).tolist(), False),
        (rng.integers(3, 5000, 1).tolist() + [eos], True),
        (rng.integers(3, 5000, 7).tolist(), False),
        (rng.integers(3, 5000, 2).tolist() + [eos], True),
        (rng.integers(3, 5000, 9).tolist() + [eos], True),
    ]
    records = [
        {
            "id": str(k),
            "prompt": "",
            "prompt_ids": prompts[k],
            "chosen": "",
            "rejected": "",
            "chosen_ids": responses[2 * k][0],
            "rejected_ids": responses[2 * k + 1][0],
            "chosen_eos": responses[2 * k][1],
            "rejected_eos": responses[2 * k + 1][1],
        }
        for k in range(3)
    ]
    cfg = types.SimpleNamespace(
        train=training.TrainConfig(batch_size=2, logp_chunk_size=8),
        data=types.SimpleNamespace(
            max_prompt_tokens=64, max_response_tokens=16, use_chat_template=True
        ),
    )
    jax_models = policy_and_reference["jaxalign"]
    want = {
        name: scoring.response_logps(*nnx.split(model), records, tokenizer, cfg)
        for name, model in zip(("policy", "init"), jax_models, strict=True)
    }

    policy, init = policy_and_reference["torch"]
    rows = [prompts[k // 2] for k in range(6)]
    got = torch_spa.response_logps(policy, rows, [r for r, _ in responses], 0, rows_per_batch=4)
    np.testing.assert_allclose(got.reshape(3, 2), want["policy"], rtol=1e-5, atol=1e-4)

    settings = torch_spa.PeerSettings(beta=0.1, batch_size=2, max_response_tokens=16)
    candidates = [responses[2 * k : 2 * k + 2] for k in range(3)]
    pairs = torch_spa.judge_pairs(policy, init, prompts, candidates, settings, pad_id=0)
    rewards = 0.1 * (want["policy"] - want["init"])
    assert len(pairs) == 3
    for k, pair in enumerate(pairs):
        hi = int(np.argmax(rewards[k]))
        assert pair["chosen_ids"] == responses[2 * k + hi][0]
        assert pair["rejected_ids"] == responses[2 * k + 1 - hi][0]
        np.testing.assert_allclose(pair["margin"], abs(rewards[k, 0] - rewards[k, 1]), atol=1e-5)


def test_lr_multiplier_is_jaxalign_schedule():
    """The peer's learning-rate schedule equals optax's of jaxalign.training.make_schedule."""
    for schedule in ("cosine", "linear", "constant"):
        config = training.TrainConfig(learning_rate=2.0, warmup_ratio=0.25, schedule=schedule)
        want = training.make_schedule(config, 10)
        for step in range(12):
            got = 2.0 * torch_spa.lr_multiplier(step, 10, 0.25, schedule)
            np.testing.assert_allclose(got, float(want(step)), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_spa_round_with_the_torch_peer_prints_both_sides(tiny_model_dir, tmp_path):
    """benchmarks/spa_round.py at a tiny size (the tiny model, 4 prompts, 8 new tokens): one
    JSON line with both sides' stage seconds, the ratios and the sampling rates."""
    seed = tmp_path / "seed.jsonl"
    from jaxalign.data.records import DEMO_FILES

    seed.write_text("\n".join(DEMO_FILES["pairs"].read_text().splitlines()[:4]) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run
    env["PYTHONPATH"] = str(ROOT)
    env["TMPDIR"] = str(tmp_path)  # the script's run directory (tempfile.mkdtemp) lands here
    overrides = [
        f"model.name={tiny_model_dir}",
        f"data.seed_pairs={seed}",
        "data.max_prompt_tokens=48",
        "data.max_response_tokens=8",
        "sampling.max_new_tokens=8",
        "train.batch_size=4",
        "spa.seed_epochs=1",
        "run.generate_batch_size=4",
        "run.export_hf=none",
        "eval.enabled=false",
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "spa_round.py"), "--prompts", "4", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["benchmark"] == "spa_round" and result["prompts"] == 4
    for side in ("jaxalign", "torch"):
        seconds = result["seconds"][side]
        assert all(seconds[k] > 0 for k in ("sample", "judge", "train"))
        assert seconds["total"] == pytest.approx(
            seconds["sample"] + seconds["judge"] + seconds["train"], abs=2e-3
        )
        assert 0 < result["sample_tokens"][side] <= 4 * 2 * 8
        assert result["sample_tokens_per_s"][side] > 0
    ratio = result["ratio_torch_over_jaxalign"]
    assert ratio["total"] == pytest.approx(
        result["seconds"]["torch"]["total"] / result["seconds"]["jaxalign"]["total"], rel=1e-2
    )
    assert set(result["round_1_seconds"]) == {"sample", "judge", "train", "checkpoint", "eval"}
