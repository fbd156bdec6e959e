"""Losses against numpy formulas written out independently, with uneven weights and smoothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

BETA = 0.3


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    b = 6
    return dict(
        pc=rng.normal(-40, 5, b),
        pr=rng.normal(-42, 5, b),
        rc=rng.normal(-41, 5, b),
        rr=rng.normal(-41, 5, b),
        w=np.array([1.0, 0.5, 2.0, 0.0, 1.5, 0.25]),
        a=np.array([0.0, 0.1, 0.3, 0.2, 0.05, 0.4]),
    )


def _args(p):
    return [jnp.asarray(p[k], jnp.float32) for k in ("pc", "pr", "rc", "rr", "w", "a")]


def _wmean(v, w):
    return np.sum(w * v) / max(np.sum(w), 1e-8)


def _delta(p):
    return (p["pc"] - p["rc"]) - (p["pr"] - p["rr"])


def test_dpo_sigmoid_matches_formula(pairs):
    z = BETA * _delta(pairs)
    a = pairs["a"]
    ref = -(1 - a) * _log_sigmoid(z) - a * _log_sigmoid(-z)
    loss, aux = losses.dpo_sigmoid_loss(*_args(pairs), beta=BETA)
    np.testing.assert_allclose(loss, _wmean(ref, pairs["w"]), rtol=1e-5)
    w = pairs["w"]
    np.testing.assert_allclose(
        aux["rewards/chosen"], _wmean(BETA * (pairs["pc"] - pairs["rc"]), w), rtol=1e-5
    )
    np.testing.assert_allclose(aux["rewards/margin"], _wmean(z, w), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux["rewards/accuracy"], _wmean((z > 0).astype(float), w))
    np.testing.assert_allclose(aux["logps/rejected"], _wmean(pairs["pr"], w), rtol=1e-5)


def test_dpo_plain_value_by_hand():
    # One pair, Δ = (−10 − −12) − (−15 − −14) = 3, β = 0.1: loss = −log σ(0.3) = log(1 + e^−0.3).
    one = lambda x: jnp.array([x], jnp.float32)
    loss, _ = losses.dpo_sigmoid_loss(
        one(-10), one(-15), one(-12), one(-14), one(1), one(0), beta=0.1
    )
    np.testing.assert_allclose(loss, np.log1p(np.exp(-0.3)), rtol=1e-6)


def test_ipo_matches_formula(pairs):
    d = _delta(pairs)
    a, t = pairs["a"], 1 / (2 * BETA)
    ref = (1 - a) * (d - t) ** 2 + a * (d + t) ** 2
    loss, _ = losses.ipo_loss(*_args(pairs), beta=BETA)
    np.testing.assert_allclose(loss, _wmean(ref, pairs["w"]), rtol=1e-5)


def test_hinge_matches_formula(pairs):
    z = BETA * _delta(pairs)
    a = pairs["a"]
    ref = (1 - a) * np.maximum(0, 1 - z) + a * np.maximum(0, 1 + z)
    loss, _ = losses.hinge_loss(*_args(pairs), beta=BETA)
    np.testing.assert_allclose(loss, _wmean(ref, pairs["w"]), rtol=1e-5)


def test_robust_dpo_matches_formula_and_is_unbiased(pairs):
    z = BETA * _delta(pairs)
    e = pairs["a"]
    ref = (-(1 - e) * _log_sigmoid(z) + e * _log_sigmoid(-z)) / (1 - 2 * e)
    loss, _ = losses.robust_dpo_loss(*_args(pairs), beta=BETA)
    np.testing.assert_allclose(loss, _wmean(ref, pairs["w"]), rtol=1e-5)
    # Chowdhury et al.'s unbiasedness: E over flips with rate ε of the robust loss = clean loss.
    flipped = (-(1 - e) * _log_sigmoid(-z) + e * _log_sigmoid(z)) / (1 - 2 * e)
    np.testing.assert_allclose((1 - e) * ref + e * flipped, -_log_sigmoid(z), rtol=1e-6)


def test_ranking_matches_formula(pairs):
    nc = np.array([10, 20, 5, 7, 1, 30.0])
    nr = np.array([12, 9, 5, 0, 4, 25.0])
    d = pairs["pc"] / nc - pairs["pr"] / np.maximum(nr, 1)
    a, m = pairs["a"], 0.5
    ref = (1 - a) * np.maximum(0, m - d) + a * np.maximum(0, m + d)
    f = lambda x: jnp.asarray(x, jnp.float32)
    loss, aux = losses.ranking_loss(
        f(pairs["pc"]), f(pairs["pr"]), f(nc), f(nr), f(pairs["w"]), f(pairs["a"]), margin=m
    )
    np.testing.assert_allclose(loss, _wmean(ref, pairs["w"]), rtol=1e-5)
    np.testing.assert_allclose(aux["ranking/accuracy"], _wmean((d > 0).astype(float), pairs["w"]))


def test_weighted_sft_matches_formula():
    logps = np.array([-30.0, -12.0, -50.0, -7.0])
    n = np.array([10.0, 4.0, 25.0, 7.0])
    w = np.array([0.9, 0.1, 0.0, 0.5])
    loss, _ = losses.weighted_sft_loss(jnp.asarray(logps), jnp.asarray(n), jnp.asarray(w))
    np.testing.assert_allclose(loss, np.sum(w * (-logps / n)) / np.sum(w), rtol=1e-6)


def test_all_padding_batch_gives_zero_loss(pairs):
    args = _args(pairs)
    args[4] = jnp.zeros_like(args[4])
    for fn in losses.PREFERENCE_LOSSES.values():
        loss, _ = fn(*args, beta=BETA)
        assert float(loss) == 0.0


@pytest.mark.parametrize("name", sorted(losses.PREFERENCE_LOSSES))
def test_weight_zero_pair_has_exactly_zero_gradient(pairs, name):
    fn = losses.PREFERENCE_LOSSES[name]
    args = _args(pairs)
    # Pair 3 has weight 0; give it garbage values, including a huge margin.
    args[0] = args[0].at[3].set(1e4)
    grads = jax.grad(lambda pc, pr: fn(pc, pr, *args[2:], beta=BETA)[0], argnums=(0, 1))(
        args[0], args[1]
    )
    for g in grads:
        assert float(g[3]) == 0.0
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.any(np.asarray(g) != 0.0)


def test_ranking_metrics_and_length_clamp_by_hand(pairs):
    """Every metric the ranking loss reports, by hand; a 0-token and a 1-token response in
    pairs that count (an empty response scores 0, a 1-token one its log-prob)."""
    nc = np.array([1, 20, 5, 7, 3, 30.0])
    nr = np.array([12, 0, 5, 2, 4, 1.0])
    w = np.array([1.0, 0.5, 2.0, 0.3, 1.5, 0.25])
    sc, sr = pairs["pc"] / np.maximum(nc, 1), pairs["pr"] / np.maximum(nr, 1)
    d = sc - sr
    f = lambda x: jnp.asarray(x, jnp.float32)
    loss, aux = losses.ranking_loss(
        f(pairs["pc"]), f(pairs["pr"]), f(nc), f(nr), f(w), f(pairs["a"])
    )
    a = pairs["a"]  # the default margin is RRHF's 0
    np.testing.assert_allclose(
        loss, _wmean((1 - a) * np.maximum(0, -d) + a * np.maximum(0, d), w), rtol=1e-5
    )
    expected = {
        "ranking/chosen_score": _wmean(sc, w),
        "ranking/rejected_score": _wmean(sr, w),
        "ranking/margin": _wmean(d, w),
        "ranking/accuracy": _wmean((d > 0).astype(float), w),
        "logps/chosen": _wmean(pairs["pc"], w),
        "logps/rejected": _wmean(pairs["pr"], w),
    }
    assert set(aux) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(aux[name], value, rtol=1e-5, err_msg=name)
        assert aux[name].dtype == jnp.float32


def test_weighted_sft_metrics_and_length_clamp_by_hand():
    logps = np.array([-30.0, -2.0, 0.0, -7.0])
    n = np.array([10.0, 1.0, 0.0, 7.0])  # a 1-token and an empty response, both weighted
    w = np.array([0.9, 0.4, 0.2, 0.5])
    loss, aux = losses.weighted_sft_loss(jnp.asarray(logps), jnp.asarray(n), jnp.asarray(w))
    nll = -logps / np.maximum(n, 1)
    np.testing.assert_allclose(loss, np.sum(w * nll) / np.sum(w), rtol=1e-6)
    expected = {
        "sft/nll": np.sum(w * nll) / np.sum(w),
        "sft/logps": np.sum(w * logps) / np.sum(w),
        "sft/weight_sum": np.sum(w),
    }
    assert set(aux) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(aux[name], value, rtol=1e-6, err_msg=name)
        assert aux[name].dtype == jnp.float32


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "robust", "hinge"])
def test_default_beta_is_the_papers(pairs, name):
    """β defaults to 0.1 (DPO's and SPA's setting): a call without it equals β = 0.1."""
    fn = losses.PREFERENCE_LOSSES[name]
    args = _args(pairs)
    np.testing.assert_allclose(fn(*args)[0], fn(*args, beta=0.1)[0], rtol=1e-6)


def test_preference_metrics_by_hand(pairs):
    """The metrics every preference loss reports, against numpy."""
    loss, aux = losses.dpo_sigmoid_loss(*_args(pairs), beta=BETA)
    w = pairs["w"]
    rc, rr = BETA * (pairs["pc"] - pairs["rc"]), BETA * (pairs["pr"] - pairs["rr"])
    expected = {
        "rewards/chosen": _wmean(rc, w),
        "rewards/rejected": _wmean(rr, w),
        "rewards/margin": _wmean(rc - rr, w),
        "rewards/accuracy": _wmean((rc > rr).astype(float), w),
        "logps/chosen": _wmean(pairs["pc"], w),
        "logps/rejected": _wmean(pairs["pr"], w),
        "logps/ref_chosen": _wmean(pairs["rc"], w),
        "logps/ref_rejected": _wmean(pairs["rr"], w),
    }
    assert set(expected) <= set(aux)
    for name, value in expected.items():
        np.testing.assert_allclose(aux[name], value, rtol=1e-4, err_msg=name)
