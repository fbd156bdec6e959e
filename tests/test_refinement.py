"""SPA self-refinement math against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import refinement


def test_extrapolated_distribution_matches_tempered_product():
    # softmax((1+λ)h − λg) ∝ π^(1+λ) · π_ref^(−λ): check against that numpy form.
    rng = np.random.default_rng(0)
    h, g = rng.normal(size=(3, 11)), rng.normal(size=(3, 11))
    lam = 0.25
    pi = np.exp(h) / np.exp(h).sum(-1, keepdims=True)
    pr = np.exp(g) / np.exp(g).sum(-1, keepdims=True)
    unnorm = pi ** (1 + lam) * pr ** (-lam)
    want = np.log(unnorm / unnorm.sum(-1, keepdims=True))
    got = jax.nn.log_softmax(refinement.extrapolated_logits(jnp.asarray(h), jnp.asarray(g), lam))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_extrapolation_with_zero_lambda_is_the_policy():
    h = jnp.arange(6.0)
    np.testing.assert_array_equal(refinement.extrapolated_logits(h, -h, 0.0), h)


def test_ring_buffer_keeps_the_most_recent_valid_margins():
    buf = refinement.init_margin_buffer(5)
    stream = []
    rng = np.random.default_rng(1)
    for _ in range(7):
        m = rng.normal(size=3).astype(np.float32)
        valid = rng.random(3) > 0.3
        buf = refinement.push_margins(buf, jnp.asarray(m), jnp.asarray(valid))
        stream.extend(m[valid].tolist())
    want = sorted(stream[-5:])
    assert int(buf["count"]) == min(5, len(stream))
    np.testing.assert_allclose(sorted(np.asarray(buf["margins"]).tolist()), want, rtol=1e-6)


@pytest.mark.parametrize("capacity", [2, 3, 4])
def test_a_batch_larger_than_the_buffer_leaves_its_last_entries(capacity):
    """The SPA authors' window is 50 pairs; a batch of 64 pairs must keep the newest 50, as
    pushing the pairs one by one would."""
    rng = np.random.default_rng(capacity)
    one_by_one = refinement.init_margin_buffer(capacity)
    at_once = refinement.init_margin_buffer(capacity)
    for _ in range(3):
        m = rng.normal(size=7).astype(np.float32)
        valid = rng.random(7) > 0.25
        at_once = refinement.push_margins(at_once, jnp.asarray(m), jnp.asarray(valid))
        for x, v in zip(m, valid, strict=True):
            one_by_one = refinement.push_margins(
                one_by_one, jnp.asarray([x]), jnp.asarray([bool(v)])
            )
    for key in ("margins", "count", "position"):
        np.testing.assert_array_equal(np.asarray(at_once[key]), np.asarray(one_by_one[key]))


@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_buffer_quantile_matches_numpy(n, q):
    rng = np.random.default_rng(n)
    values = rng.normal(size=n).astype(np.float32)
    buf = refinement.init_margin_buffer(64)
    buf = refinement.push_margins(buf, jnp.asarray(values), jnp.ones(n, bool))
    got = float(refinement.buffer_quantile(buf, q))
    np.testing.assert_allclose(got, np.quantile(values, q), rtol=1e-5, atol=1e-6)


def test_empty_buffer_flags_nothing():
    buf = refinement.init_margin_buffer(4)
    tau = refinement.buffer_quantile(buf, 0.1)
    assert np.isneginf(float(tau))
    z = refinement.flag_noisy_pairs(jnp.asarray([-100.0, 0.0]), tau, jnp.asarray(True))
    np.testing.assert_array_equal(z, [0.0, 0.0])


def test_flagging_respects_threshold_and_warmup():
    m = jnp.asarray([0.1, 0.5, -0.2, 0.3])
    z = refinement.flag_noisy_pairs(m, jnp.asarray(0.2), jnp.asarray(True))
    np.testing.assert_array_equal(z, [1.0, 0.0, 1.0, 0.0])
    z_off = refinement.flag_noisy_pairs(m, jnp.asarray(0.2), jnp.asarray(False))
    np.testing.assert_array_equal(z_off, [0.0, 0.0, 0.0, 0.0])
    # "Below τ": a margin equal to the threshold is not flagged.
    z_tie = refinement.flag_noisy_pairs(m, jnp.asarray(0.3), jnp.asarray(True))
    np.testing.assert_array_equal(z_tie, [1.0, 0.0, 1.0, 0.0])


def test_refined_labels_modes():
    z = jnp.asarray([1.0, 0.0])
    p = jnp.asarray([0.7, 0.9])
    s0, w0 = jnp.zeros(2), jnp.ones(2)
    s, w = refinement.refined_labels(z, p, s0, w0, 0.1, "smooth")
    np.testing.assert_allclose(s, [0.1, 0.0])
    np.testing.assert_allclose(w, [1.0, 1.0])
    s, w = refinement.refined_labels(z, p, s0, w0, 0.1, "drop")
    np.testing.assert_allclose(w, [0.0, 1.0])
    s, w = refinement.refined_labels(z, p, s0, w0, 0.1, "soft")
    np.testing.assert_allclose(s, [0.3, 0.0], atol=1e-7)
    s, w = refinement.refined_labels(z, p, s0, w0, 0.1, "confidence")
    np.testing.assert_allclose(w, [0.4, 0.8], atol=1e-6)
    with pytest.raises(ValueError, match="unknown label mode"):
        refinement.refined_labels(z, p, s0, w0, 0.1, "nope")


# ----------------------------------------------------------------------------- SPA loss


def _tiny_models():
    from flax import nnx

    from jaxalign.models import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=37,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )
    policy = Transformer(cfg, rngs=nnx.Rngs(0))
    reference = Transformer(cfg, rngs=nnx.Rngs(1))
    return policy, reference


def _batch(rng, b=4, t=10):
    ids = rng.integers(0, 37, (2, b, t)).astype(np.int32)
    attn = np.ones((2, b, t), np.int32)
    lmask = np.zeros((2, b, t), np.int32)
    for k in range(2):
        for i in range(b):
            length = rng.integers(6, t + 1)
            attn[k, i, length:] = 0
            lmask[k, i, 3:length] = 1
    return {
        "chosen_ids": ids[0],
        "rejected_ids": ids[1],
        "chosen_attention_mask": attn[0],
        "rejected_attention_mask": attn[1],
        "chosen_loss_mask": lmask[0],
        "rejected_loss_mask": lmask[1],
        "weight": np.array([1.0, 1.0, 0.5, 0.0], np.float32),
        "smoothing": np.zeros(b, np.float32),
    }


def _naive_terms(model, ref, ids, attn, lmask, lam):
    lp = np.asarray(jax.nn.log_softmax(model(ids, None, attn)[0]), np.float64)
    lr = np.asarray(jax.nn.log_softmax(ref(ids, None, attn)[0]), np.float64)
    lm = (1 + lam) * lp - lam * lr
    lm = lm - np.log(np.exp(lm).sum(-1, keepdims=True))
    tgt = np.asarray(ids)[:, 1:]
    m = np.asarray(lmask)[:, 1:]

    def total(x):
        return (np.take_along_axis(x[:, :-1], tgt[..., None], -1)[..., 0] * m).sum(-1)

    return total(lp), total(lr), total(lm)


@pytest.mark.parametrize("active", [False, True])
def test_spa_loss_matches_a_naive_computation(active):
    from flax import nnx

    policy, reference = _tiny_models()
    graphdef, ref_params = nnx.split(reference)
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(v) for k, v in _batch(rng).items()}
    beta, lam, alpha, q = 0.5, 0.25, 0.1, 0.5
    buf = refinement.init_margin_buffer(16)
    prior = jnp.asarray([-0.2, 0.0, 0.1, 0.3, 0.05], jnp.float32)
    buf = refinement.push_margins(buf, prior, jnp.ones(5, bool))
    loss_fn = refinement.spa_loss_fn(
        graphdef,
        beta=beta,
        lam=lam,
        quantile=q,
        alpha=alpha,
        flag_after_step=0 if active else 10,
        chunk_size=4,
    )
    loss, (aux, new_buf) = loss_fn(policy, batch, buf, jnp.asarray(3), None, ref_params)

    b = 4
    ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    attn = np.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    lmask = np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    lp, lr, lm = _naive_terms(policy, reference, jnp.asarray(ids), jnp.asarray(attn), lmask, lam)
    margin = beta * ((lm[:b] - lr[:b]) - (lm[b:] - lr[b:]))
    tau = np.quantile(np.asarray(prior), q)
    w = np.asarray(batch["weight"])
    z = ((margin < tau) & active & (w > 0)).astype(np.float64)
    s = alpha * z
    delta = beta * ((lp[:b] - lr[:b]) - (lp[b:] - lr[b:]))
    per = -(1 - s) * np.log(1 / (1 + np.exp(-delta))) - s * np.log(1 / (1 + np.exp(delta)))
    want = (w * per).sum() / w.sum()
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(
        float(aux["spa/flagged_fraction"]), z.sum() / (w > 0).sum(), atol=1e-7
    )
    np.testing.assert_allclose(float(aux["spa/threshold"]), tau, rtol=1e-6)
    np.testing.assert_allclose(
        float(aux["spa/extrapolated_margin"]), margin[w > 0].mean(), rtol=2e-4, atol=1e-6
    )
    assert float(aux["spa/flagging_active"]) == float(active)
    np.testing.assert_allclose(aux["pairs/extrapolated_margin"], margin, rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(aux["pairs/flagged"], z)
    # an empty window has no quantile (its threshold is -inf): it is logged as 0
    _, (empty_aux, _) = loss_fn(
        policy, batch, refinement.init_margin_buffer(16), jnp.asarray(3), None, ref_params
    )
    assert float(empty_aux["spa/threshold"]) == 0.0
    assert int(new_buf["count"]) == 5 + 3  # the weight-0 pair's margin is not recorded
    np.testing.assert_allclose(
        sorted(np.asarray(new_buf["margins"])[:8]),
        sorted(np.concatenate([np.asarray(prior), margin[w > 0]])),
        rtol=2e-4,
        atol=1e-5,
    )


def test_spa_loss_gradient_flows_only_through_the_policy():
    from flax import nnx

    policy, reference = _tiny_models()
    graphdef, ref_params = nnx.split(reference)
    _, params = nnx.split(policy)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(1)).items()}
    loss_fn = refinement.spa_loss_fn(
        graphdef, beta=0.1, lam=0.5, quantile=0.1, alpha=0.1, flag_after_step=0
    )
    buf = refinement.init_margin_buffer(8)

    def f(p, r):
        return loss_fn(nnx.merge(graphdef, p), batch, buf, jnp.asarray(0), None, r)[0]

    g_ref = jax.grad(f, argnums=1)(params, ref_params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_ref))
    g_pol = jax.grad(f)(params, ref_params)
    assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(g_pol))


def _loss_setup(**kwargs):
    from flax import nnx

    policy, reference = _tiny_models()
    graphdef, ref_params = nnx.split(reference)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0)).items()}
    buf = refinement.init_margin_buffer(16)
    prior = jnp.asarray([-0.2, 0.0, 0.1, 0.3, 0.05], jnp.float32)
    buf = refinement.push_margins(buf, prior, jnp.ones(5, bool))
    settings = dict(beta=0.5, lam=0.25, quantile=0.5, alpha=0.1, flag_after_step=3, chunk_size=4)
    settings.update(kwargs)
    loss_fn = refinement.spa_loss_fn(graphdef, **settings)
    b = 4
    ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    attn = np.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    lmask = np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    lp, lr, lm = _naive_terms(
        policy, reference, jnp.asarray(ids), jnp.asarray(attn), lmask, settings["lam"]
    )
    beta = settings["beta"]
    margin = beta * ((lm[:b] - lr[:b]) - (lm[b:] - lr[b:]))
    delta = beta * ((lp[:b] - lr[:b]) - (lp[b:] - lr[b:]))
    tau = np.quantile(np.asarray(prior), settings["quantile"])
    w = np.asarray(batch["weight"], np.float64)

    def naive(smoothing, weight):
        per = -(1 - smoothing) * np.log(1 / (1 + np.exp(-delta))) - smoothing * np.log(
            1 / (1 + np.exp(delta))
        )
        return (weight * per).sum() / weight.sum()

    def run(step, **batch_changes):
        return loss_fn(policy, {**batch, **batch_changes}, buf, jnp.asarray(step), None, ref_params)

    z = ((margin < tau) & (w > 0)).astype(np.float64)
    return run, naive, z, w, loss_fn, policy, batch, buf


def test_spa_loss_needs_the_reference_and_says_so():
    _, _, _, _, loss_fn, policy, batch, buf = _loss_setup()
    with pytest.raises(
        ValueError, match=r"needs the reference parameters as train_step's `frozen`"
    ):
        loss_fn(policy, batch, buf, jnp.asarray(0), None)


def test_flagging_starts_at_flag_after_step_exactly():
    run, naive, z, w, *_ = _loss_setup(flag_after_step=3)
    assert z.any() and not z.all()
    before, (aux_before, _) = run(2)
    at, (aux_at, _) = run(3)
    assert float(aux_before["spa/flagging_active"]) == 0.0
    assert float(aux_at["spa/flagging_active"]) == 1.0
    np.testing.assert_allclose(float(before), naive(np.zeros(4), w), rtol=2e-5)
    np.testing.assert_allclose(float(at), naive(0.1 * z, w), rtol=2e-5)


def test_label_modes_read_the_judges_preference():
    p = jnp.asarray([0.9, 0.6, 0.8, 0.7], jnp.float32)
    run, naive, z, w, *_ = _loss_setup(label_mode="soft")
    loss, _ = run(5, p=p)
    np.testing.assert_allclose(float(loss), naive(np.where(z > 0, 1 - np.asarray(p), 0.0), w), 2e-5)
    run, naive, z, w, *_ = _loss_setup(label_mode="confidence")
    loss, _ = run(5, p=p)
    np.testing.assert_allclose(float(loss), naive(np.zeros(4), w * np.abs(2 * p - 1)), rtol=2e-5)
    loss, _ = run(5)  # no p in the batch: a sure judge (p = 1), weights unchanged
    np.testing.assert_allclose(float(loss), naive(np.zeros(4), w), rtol=2e-5)


def test_without_refinement_it_is_dpo_on_the_fly():
    run, naive, _, w, *_ = _loss_setup(refine=False, flag_after_step=0)
    loss, (aux, _) = run(5)
    np.testing.assert_allclose(float(loss), naive(np.zeros(4), w), rtol=2e-5)
    assert not any(k.startswith(("spa/", "pairs/")) for k in aux)


def test_margin_buffer_capacity_is_checked_and_one_slot_works():
    with pytest.raises(ValueError, match="margin buffer capacity must be positive, got 0"):
        refinement.init_margin_buffer(0)
    buf = refinement.init_margin_buffer(1)
    assert buf["margins"].dtype == jnp.float32 and buf["margins"].shape == (1,)
    buf = refinement.push_margins(buf, jnp.asarray([0.4, -0.3]), jnp.asarray([True, True]))
    assert int(buf["count"]) == 1 and float(buf["margins"][0]) == pytest.approx(-0.3)
    assert float(refinement.buffer_quantile(buf, 0.1)) == pytest.approx(-0.3)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_a_chunk_s_extrapolated_terms_against_plain_log_softmaxes(vocab_major, skip, request):
    """``log π``, ``log π_ref`` and ``log p̃`` of one chunk against plain log-softmaxes;
    the gradient is ``log π``'s alone (the other two are the step's constants); a chunk
    with nothing scored computes zeros."""
    if skip:
        request.getfixturevalue("skipping")
    rng = np.random.default_rng(4)
    hp, hr = (jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32) for _ in range(2))
    w, w_ref = (jnp.asarray(rng.normal(size=(8, 13)) * 0.3, jnp.float32) for _ in range(2))
    targets = jnp.asarray(rng.integers(0, 13, (2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], jnp.float32)
    lam = 0.25

    def stored(x):
        return x.T if vocab_major else x

    def terms(hp, w, hr, w_ref, mask):
        return refinement.chunk_extrapolated_logps(
            lam, vocab_major, hp, stored(w), hr, stored(w_ref), targets, mask
        )

    def picked(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask  # per position

    got = terms(hp, w, hr, w_ref, mask)
    want = (picked(hp @ w), picked(hr @ w_ref), picked((1 + lam) * (hp @ w) - lam * (hr @ w_ref)))
    for g, x in zip(got, want, strict=True):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)

    weights = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)  # a cotangent per position

    def total(hp, w, hr, w_ref):
        return sum(
            jnp.sum(t * c) for t, c in zip(terms(hp, w, hr, w_ref, mask), weights, strict=True)
        )

    grads = jax.grad(total, argnums=(0, 1, 2, 3))(hp, w, hr, w_ref)
    want_grads = jax.grad(lambda hp, w: jnp.sum(picked(hp @ w) * weights[0]), (0, 1))(hp, w)
    np.testing.assert_allclose(grads[0], want_grads[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[1], want_grads[1], rtol=1e-5, atol=1e-6)
    assert not np.any(grads[2]) and not np.any(grads[3])

    nothing = terms(hp, w, hr, w_ref, jnp.zeros_like(mask))
    assert all(not np.any(t) for t in nothing)
