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


def test_push_rejects_batches_larger_than_the_buffer():
    with pytest.raises(ValueError, match="does not fit"):
        refinement.push_margins(refinement.init_margin_buffer(2), jnp.zeros(3), jnp.ones(3))


@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
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
