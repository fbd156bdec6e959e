"""The train step: chunked log-probs, sharding, accumulation, padding pairs, skips, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import parallel, training
from jaxalign.models.llama import ModelConfig, Transformer, project

TINY = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_embeddings=True,
)
B, T = 8, 16
STEPS = 20


def _sequences(rng, b=B, t=T):
    """Right-padded prompt+response rows: prompt 2..5 tokens, total 6..t."""
    ids = rng.integers(1, TINY.vocab_size, (b, t)).astype(np.int32)
    lengths = rng.integers(6, t + 1, b)
    prompts = rng.integers(2, 6, b)
    cols = np.arange(t)[None]
    attention = (cols < lengths[:, None]).astype(np.int32)
    loss = (attention * (cols >= prompts[:, None])).astype(np.int32)
    return ids * attention, attention, loss


def make_batch(seed, b=B, t=T, weight=None, smoothing=None):
    rng = np.random.default_rng(seed)
    c, r = _sequences(rng, b, t), _sequences(rng, b, t)
    return {
        "chosen_ids": c[0],
        "chosen_attention_mask": c[1],
        "chosen_loss_mask": c[2],
        "rejected_ids": r[0],
        "rejected_attention_mask": r[1],
        "rejected_loss_mask": r[2],
        "weight": (rng.uniform(0.5, 2.0, b) if weight is None else weight).astype(np.float32),
        "smoothing": (rng.uniform(0, 0.3, b) if smoothing is None else smoothing).astype(
            np.float32
        ),
        "ref_chosen_logps": rng.normal(-40, 3, b).astype(np.float32),
        "ref_rejected_logps": rng.normal(-40, 3, b).astype(np.float32),
    }


CONFIG = training.TrainConfig(learning_rate=1e-3, warmup_ratio=0.0, logp_chunk_size=5)


@pytest.fixture(scope="module")
def model():
    return Transformer(TINY, rngs=nnx.Rngs(0))


_STEPS_BUILT = {}


def build(model, mesh, config=CONFIG, loss_fn=None):
    """A fresh state and a train step; DPO steps are shared between tests (compile once)."""
    graphdef, state, shardings = training.create_train_state(model, config, STEPS, mesh)
    key = (tuple(mesh.shape.items()), config)
    if loss_fn is None and key in _STEPS_BUILT:
        return graphdef, state, shardings, _STEPS_BUILT[key]
    step = training.make_train_step(
        graphdef,
        config,
        mesh,
        loss_fn or training.dpo_loss_fn(config),
        shardings,
        total_steps=STEPS,
    )
    if loss_fn is None:
        _STEPS_BUILT[key] = step
    return graphdef, state, shardings, step


def one_device():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _naive_logps(model, ids, attention, loss_mask):
    """Full ``[B,T,V]`` logits, numpy log-softmax, shift by one, masked sum."""
    logits, _ = model(jnp.asarray(ids), None, jnp.asarray(attention))
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return (picked * loss_mask[:, 1:]).sum(-1), loss_mask[:, 1:].sum(-1)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logps_equal_full_logits(model, chunk):
    ids, attention, loss_mask = _sequences(np.random.default_rng(1))
    got, n = training.sequence_logps(model, ids, attention, loss_mask, chunk_size=chunk)
    want, want_n = _naive_logps(model, ids, attention, loss_mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(n, want_n)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_map_sequence_chunks_covers_every_position_once(chunk):
    """Chunks (the last zero-padded) put every position through ``fn`` exactly once."""
    x = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)
    m = np.ones((2, 7), np.float32)
    per_chunk = training.map_sequence_chunks(
        lambda a, b: (jnp.sum(a * b[..., None], axis=1), a.shape[1]), (x, m), chunk
    )
    sums, widths = per_chunk
    np.testing.assert_array_equal(np.sum(sums, axis=0), x.sum(axis=1))
    assert sums.shape[0] == -(-7 // min(chunk, 7)) and set(np.asarray(widths)) == {min(chunk, 7)}


def test_next_token_targets_shift_ids_and_mask_left():
    ids = np.asarray([[5, 6, 7, 8]], np.int32)
    mask = np.asarray([[0, 1, 1, 0]], np.int32)
    targets, shifted = training.next_token_targets(ids, mask)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 0]])
    np.testing.assert_array_equal(shifted, [[1, 1, 0, 0]])
    assert shifted.dtype == jnp.float32


def test_chunked_logps_gradients_equal_full_logits(model):
    ids, attention, loss_mask = _sequences(np.random.default_rng(2))
    graphdef, params = nnx.split(model)
    coef = jnp.linspace(0.5, 1.5, B)

    def chunked(p):
        s, _ = training.sequence_logps(nnx.merge(graphdef, p), ids, attention, loss_mask, 5)
        return jnp.sum(coef * s)

    def full(p):
        logits, _ = nnx.merge(graphdef, p)(jnp.asarray(ids), None, jnp.asarray(attention))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(coef * jnp.sum(picked * loss_mask[:, 1:], -1))

    g_chunked = jax.grad(chunked)(params)
    g_full = jax.grad(full)(params)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_policies_give_the_stored_activations_gradients(model, remat):
    ids, attention, loss_mask = _sequences(np.random.default_rng(4))
    coef = jnp.linspace(0.5, 1.5, B)

    def grads(remat_setting):
        m = training.configure_model(model, training.TrainConfig(remat=remat_setting))
        graphdef, params = nnx.split(m)

        def objective(p):
            s, _ = training.sequence_logps(nnx.merge(graphdef, p), ids, attention, loss_mask, 5)
            return jnp.sum(coef * s)

        return jax.jit(jax.grad(objective))(params)

    stored, recomputed = grads("none"), grads(remat)
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(recomputed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_reference_logps_match_naive(model):
    batch = make_batch(3)
    graphdef, params = nnx.split(model)
    ref = training.compute_reference_logps(graphdef, params, batch, chunk_size=4)
    for side in ("chosen", "rejected"):
        want, _ = _naive_logps(
            model, batch[f"{side}_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"]
        )
        np.testing.assert_allclose(ref[f"ref_{side}_logps"], want, rtol=1e-5, atol=1e-4)


def test_dpo_step_loss_matches_numpy(model):
    """First step's reported loss = the conservative-DPO formula on naive log-probs."""
    batch = make_batch(4)
    _, state, _, step = build(model, one_device())
    _, metrics = step(state, batch)
    pc, _ = _naive_logps(
        model, batch["chosen_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"]
    )
    pr, _ = _naive_logps(
        model, batch["rejected_ids"], batch["rejected_attention_mask"], batch["rejected_loss_mask"]
    )
    z = CONFIG.beta * ((pc - batch["ref_chosen_logps"]) - (pr - batch["ref_rejected_logps"]))
    a, w = batch["smoothing"], batch["weight"]
    ls = lambda x: -np.log1p(np.exp(-x))
    want = np.sum(w * (-(1 - a) * ls(z) - a * ls(-z))) / np.sum(w)
    np.testing.assert_allclose(metrics["train/loss"], want, rtol=1e-5)


def _run(step, state, batches):
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def test_sharded_step_equals_single_device(model):
    batches = [make_batch(10 + i) for i in range(3)]
    _, state, _, step = build(model, one_device())
    single, m1 = _run(step, state, batches)
    mesh = parallel.make_mesh(2, 2, 2)
    _, state, shardings, step = build(model, mesh)
    # The embedding really is split: vocab over tensor, embed over fsdp.
    assert state.params["embed_tokens"].sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp"
    )
    sharded, m8 = _run(step, state, batches)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], atol=1e-5)
        np.testing.assert_allclose(a["train/grad_norm"], b["train/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_micro_batches_equal_one_big_batch(model):
    batches = [make_batch(20 + i) for i in range(3)]
    _, state, _, step = build(model, one_device())
    whole, m1 = _run(step, state, batches)
    config4 = training.TrainConfig(**{**CONFIG.__dict__, "micro_batches": 4})
    _, state, _, step = build(model, parallel.make_mesh(2, 1, 1, jax.devices()[:2]), config4)
    accumulated, m4 = _run(step, state, batches)
    for a, b in zip(m1, m4, strict=True):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(a["train/grad_norm"], b["train/grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(a["rewards/margin"], b["rewards/margin"], rtol=1e-4, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params), strict=True
    ):
        # Three Adam steps at lr 1e-3: a last-bit difference in a near-zero gradient's
        # sum order moves that parameter by up to ~1% of one update (1e-5).
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_per_pair_metrics_keep_the_batch_row_order_through_micro_batches(model):
    """A ``pairs/...`` metric comes back per row, in the batch's order, whether or not the
    step splits the batch into (interleaved) micro-batches."""
    dpo = training.dpo_loss_fn(CONFIG)

    def loss_fn(model, batch, algo_state, step, rng, frozen=None):
        loss, (aux, algo_state) = dpo(model, batch, algo_state, step, rng, frozen)
        return loss, ({**aux, "pairs/weight": batch["weight"] * 1.0}, algo_state)

    batch = make_batch(40, weight=np.arange(1, B + 1, dtype=np.float32))
    _, state, _, step = build(model, one_device(), loss_fn=loss_fn)
    _, whole = step(state, batch)
    config4 = training.TrainConfig(**{**CONFIG.__dict__, "micro_batches": 4})
    mesh = parallel.make_mesh(2, 1, 1, jax.devices()[:2])
    _, state, _, step = build(model, mesh, config4, loss_fn=loss_fn)
    _, split = step(state, batch)
    np.testing.assert_array_equal(np.asarray(whole["pairs/weight"]), np.arange(1, B + 1))
    np.testing.assert_array_equal(np.asarray(split["pairs/weight"]), np.arange(1, B + 1))
    np.testing.assert_allclose(whole["train/loss"], split["train/loss"], rtol=1e-5)


def test_weight_zero_garbage_pair_changes_nothing(model):
    clean = make_batch(30, b=7)
    garbage = make_batch(31, b=1, weight=np.zeros(1), smoothing=np.full(1, 0.4))
    garbage["ref_chosen_logps"][:] = 1e4  # absurd reference values must not leak either
    padded = {k: np.concatenate([clean[k], garbage[k]]) for k in clean}
    _, state, _, step = build(model, one_device())
    a_state, a_m = step(state, clean)
    _, state, _, step = build(model, one_device())
    b_state, b_m = step(state, padded)
    np.testing.assert_allclose(a_m["train/loss"], b_m["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(a_m["train/grad_norm"], b_m["train/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_non_finite_loss_skips_the_update(model):
    _, state, _, step = build(model, one_device())
    state, _ = step(state, make_batch(40))
    before = jax.device_get(state)
    bad = make_batch(41)
    bad["ref_chosen_logps"][2] = np.nan
    state, metrics = step(state, bad)
    assert int(metrics["train/skipped"]) == 1 and int(metrics["train/skipped_total"]) == 1
    assert int(state.step) == 2 and int(state.skipped_steps) == 1
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, make_batch(42))
    assert int(metrics["train/skipped"]) == 0 and np.isfinite(metrics["train/loss"])


def test_step_compiles_once_per_bucket(model):
    traces = []
    inner = training.dpo_loss_fn(CONFIG)

    def counting_loss(*args):
        traces.append(1)  # runs only while tracing
        return inner(*args)

    _, state, _, step = build(model, parallel.make_mesh(2, 2, 2), loss_fn=counting_loss)
    for i in range(5):
        state, _ = step(state, make_batch(50 + i))
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_on_the_fly_reference_equals_precomputed(model):
    reference = Transformer(TINY, rngs=nnx.Rngs(7))
    graphdef_ref, ref_params = nnx.split(reference)
    batch = make_batch(60)
    pre = training.compute_reference_logps(graphdef_ref, ref_params, batch, chunk_size=5)
    batch.update({k: np.asarray(v) for k, v in pre.items()})
    _, state, _, step = build(model, one_device())
    _, m_pre = step(state, batch)

    mesh = one_device()
    graphdef, state, shardings = training.create_train_state(model, CONFIG, STEPS, mesh)
    frozen_shardings = parallel.model_shardings(ref_params, mesh)
    step = training.make_train_step(
        graphdef,
        CONFIG,
        mesh,
        training.dpo_loss_fn(CONFIG, graphdef),
        shardings,
        total_steps=STEPS,
        frozen_shardings=frozen_shardings,
    )
    live = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    _, m_live = step(state, live, ref_params)
    for key in ("train/loss", "train/grad_norm", "rewards/margin"):
        np.testing.assert_allclose(m_pre[key], m_live[key], rtol=1e-5, atol=1e-6)


def test_schedule_warmup_then_cosine():
    config = training.TrainConfig(learning_rate=1.0, warmup_ratio=0.1)
    lr = training.make_schedule(config, 100)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
    # HF get_cosine_schedule_with_warmup: 0.5·(1 + cos(π·progress)) after warm-up.
    np.testing.assert_allclose(lr(55), 0.5 * (1 + np.cos(np.pi * 45 / 90)), atol=1e-6)
    np.testing.assert_allclose(lr(100), 0.0, atol=1e-6)


@pytest.mark.parametrize(
    ("schedule", "warmup_ratio", "total", "want"),
    [
        # HF get_linear_schedule_with_warmup: peak·(total − step)/(total − warmup) after it
        ("linear", 0.25, 8, {0: 0.0, 1: 1.0, 2: 2.0, 4: 4 / 3, 6: 2 / 3, 8: 0.0}),
        ("constant", 0.25, 8, {0: 0.0, 1: 1.0, 2: 2.0, 5: 2.0, 8: 2.0}),
        ("cosine", 0.0, 4, {0: 2.0, 1: 1.0 + 2**-0.5, 2: 1.0, 4: 0.0}),  # no warm-up
        ("linear", 0.0, 0, {0: 2.0, 1: 0.0}),  # a run of no steps counts as one
    ],
)
def test_schedules_by_hand(schedule, warmup_ratio, total, want):
    config = training.TrainConfig(learning_rate=2.0, warmup_ratio=warmup_ratio, schedule=schedule)
    lr = training.make_schedule(config, total)
    got = {step: float(lr(step)) for step in want}
    assert got == pytest.approx(want, abs=1e-6)


def test_the_optimizer_is_clipped_adamw_by_hand():
    """Two updates of ``make_optimizer`` against AdamW written out (Loshchilov & Hutter;
    torch's form: bias-corrected moments, decoupled decay) after global-norm clipping."""
    config = training.TrainConfig(
        learning_rate=0.1,
        warmup_ratio=0.0,
        schedule="constant",
        weight_decay=0.5,
        adam_b1=0.8,
        adam_b2=0.9,
        adam_eps=1e-3,
        max_grad_norm=2.0,
    )
    opt = training.make_optimizer(config, 10)
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    grads = [
        {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])},  # norm 5: clipped to 2
        {"w": jnp.array([0.5, -0.5]), "b": jnp.array([1.0])},  # norm 1.22: kept
    ]
    state = opt.init(params)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, start=1):
        updates, state = opt.update(g, state, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        scale = min(1.0, 2.0 / norm)
        for k in p:
            gk = g[k] * scale
            m[k] = 0.8 * m[k] + 0.2 * gk
            v[k] = 0.9 * v[k] + 0.1 * gk**2
            m_hat, v_hat = m[k] / (1 - 0.8**t), v[k] / (1 - 0.9**t)
            p[k] = p[k] - 0.1 * (m_hat / (np.sqrt(v_hat) + 1e-3) + 0.5 * p[k])
        for k in p:
            np.testing.assert_allclose(params[k], p[k], rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_master_weights(model):
    config = training.TrainConfig(**{**CONFIG.__dict__, "compute_dtype": "bfloat16"})
    graphdef, state, _, step = build(model, one_device(), config)
    batch = make_batch(70)
    state, metrics = step(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert nnx.merge(graphdef, state.params).config.dtype == "bfloat16"
    _, state32, _, step32 = build(model, one_device())
    _, m32 = step32(state32, batch)
    np.testing.assert_allclose(metrics["train/loss"], m32["train/loss"], rtol=2e-2)


def test_ranking_and_sft_loss_functions_match_numpy(model):
    ranking = training.TrainConfig(**{**CONFIG.__dict__, "loss": "ranking", "ranking_margin": 0.5})
    _, state, _, step = build(model, one_device(), ranking)
    batch = {k: v for k, v in make_batch(80).items() if not k.startswith("ref_")}
    _, m = step(state, batch)
    sides = {}
    for side in ("chosen", "rejected"):
        logps, n = _naive_logps(
            model, batch[f"{side}_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"]
        )
        sides[side] = logps / n
    d = sides["chosen"] - sides["rejected"]
    a, w = batch["smoothing"], batch["weight"]
    want = np.sum(w * ((1 - a) * np.maximum(0, 0.5 - d) + a * np.maximum(0, 0.5 + d))) / w.sum()
    np.testing.assert_allclose(m["train/loss"], want, rtol=1e-5)

    rng = np.random.default_rng(81)
    ids, attention, loss_mask = _sequences(rng)
    sft = {
        "sft_ids": ids,
        "sft_attention_mask": attention,
        "sft_loss_mask": loss_mask,
        "sft_weight": rng.uniform(0, 1, B).astype(np.float32),
    }
    _, state, _, step = build(model, one_device(), CONFIG, training.sft_loss_fn(CONFIG))
    _, m = step(state, sft)
    logps, n = _naive_logps(model, ids, attention, loss_mask)
    w = sft["sft_weight"]
    np.testing.assert_allclose(m["train/loss"], np.sum(w * -logps / n) / np.sum(w), rtol=1e-5)


def test_config_errors_are_actionable():
    with pytest.raises(ValueError, match="train.loss"):
        training.TrainConfig(loss="dpo++")
    with pytest.raises(ValueError, match="micro_batches"):
        training.TrainConfig(batch_size=10, micro_batches=4)
    with pytest.raises(ValueError, match="train.remat.*dots"):
        training.TrainConfig(remat="some")


@pytest.mark.parametrize("backend", ["cpu", "tpu", "gpu"])
def test_logsumexp_is_a_matmul_only_on_cpu(backend, monkeypatch):
    """The ones-vector matmul is XLA:CPU's fast path; a TPU's or GPU's default matmul
    precision would round the float32 sum, so there it is a plain reduction. Either way
    the value is logsumexp's."""
    monkeypatch.setattr(training.jax, "default_backend", lambda: backend)
    x = jax.random.normal(jax.random.key(0), (3, 5, 257), jnp.float32) * 4.0
    jaxpr = str(jax.make_jaxpr(lambda v: training.logsumexp(v))(x))  # a fresh trace
    assert ("dot_general" in jaxpr) == (backend == "cpu")
    want = np.log(np.exp(np.asarray(x, np.float64)).sum(-1))
    np.testing.assert_allclose(np.asarray(training.logsumexp(x)), want, rtol=1e-6, atol=1e-5)


def test_steps_count_and_micro_batches_see_the_step_and_share_a_weightless_batch(model):
    """A loss that reports the step it was given and a constant: over two micro-batches of
    a batch whose weights are all 0 each micro-batch counts 1/2 (the loss is 3, not 12);
    every micro-batch sees the state's step; the state counts steps one at a time; the
    logged learning rate is the schedule's at the updates applied so far."""
    config = training.TrainConfig(
        **{**CONFIG.__dict__, "micro_batches": 2, "warmup_ratio": 0.5, "learning_rate": 0.25}
    )

    def loss_fn(model, batch, algo_state, step, rng, frozen):
        logps, _ = training.sequence_logps(
            model, batch["chosen_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"]
        )
        loss = 3.0 + 0.0 * jnp.sum(logps)
        return loss, ({"seen_step": step.astype(jnp.float32)}, algo_state)

    graphdef, state, _, step = build(model, one_device(), config, loss_fn=loss_fn)
    schedule = training.make_schedule(config, STEPS)
    batch = make_batch(80, weight=np.zeros(B, np.float32))
    for k in range(3):
        assert int(state.step) == k
        state, metrics = step(state, batch)
        assert float(metrics["train/loss"]) == pytest.approx(3.0)
        assert float(metrics["seen_step"]) == pytest.approx(k)
        assert float(metrics["train/learning_rate"]) == pytest.approx(float(schedule(k)))
    assert int(state.step) == 3 and int(state.skipped_steps) == 0


def test_state_shardings_mirror_the_params_and_replicate_the_rest(model):
    """On a 2×2×2 mesh: Adam's moments take their parameter's sharding; its step count, the
    step, the RNG, the skip counter and the algorithm state are replicated."""
    mesh = parallel.make_mesh(2, 2, 2)
    _, state, shardings = training.create_train_state(
        model, CONFIG, STEPS, mesh, algo_state={"window": jnp.zeros(4)}
    )
    rep = parallel.replicated(mesh)
    params = jax.tree.leaves(shardings.params)
    assert any(s.spec != rep.spec for s in params)  # something is sharded
    adam = [x for x in jax.tree.leaves(shardings.opt_state) if x is not None]
    assert all(isinstance(x, jax.sharding.NamedSharding) for x in adam)
    moments = [x for x in adam if x.spec != rep.spec]
    assert sorted(map(str, moments)) == sorted(
        map(str, [s for s in params if s.spec != rep.spec] * 2)
    )
    counts = jax.tree.leaves(state.opt_state)
    for leaf, sharding in zip(counts, jax.tree.leaves(shardings.opt_state), strict=True):
        if leaf.ndim == 0:  # Adam's count (and the clip's empty state has no leaves)
            assert sharding == rep
    for s in (
        shardings.step,
        shardings.rng,
        shardings.skipped_steps,
        shardings.algo_state["window"],
    ):
        assert s == rep


def test_the_compute_graphdef_is_the_policy_as_training_runs_it(model):
    graphdef, params = nnx.split(model)
    config = training.TrainConfig(**{**CONFIG.__dict__, "compute_dtype": "bfloat16"})
    computed = nnx.merge(training.compute_graphdef(graphdef, params, config), params)
    assert computed.config.dtype == "bfloat16" and model.config.dtype == "float32"
    assert computed.config.remat == CONFIG.remat != model.config.remat  # training's remat
    plain = nnx.merge(training.compute_graphdef(graphdef, params, CONFIG), params)
    assert plain.config == model.config.replace(remat=CONFIG.remat)  # the dtype kept


def test_a_bfloat16_chunk_s_gradients_keep_the_dtypes_of_its_inputs():
    """The custom backward pass of ``chunk_logps`` hands back cotangents in its inputs'
    dtypes (JAX would pass a float32 one on into the bfloat16 model), with the values of
    the float32 computation to bfloat16 precision."""
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 11)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)

    def total(h, w):
        return jnp.sum(training.chunk_logps(h, w, targets, mask))

    dh, dw = jax.grad(total, argnums=(0, 1))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32

    def plain(h, w):
        logp = jax.nn.log_softmax(h.astype(jnp.float32) @ w, axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)

    want_dh, want_dw = jax.grad(plain, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(np.float32(dh), want_dh, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dw, want_dw, rtol=2e-2, atol=2e-2)


def test_compact_positions_moves_each_row_s_masked_positions_to_its_front_in_order():
    mask = np.asarray([[0, 1, 0, 1, 1], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]], np.float32)
    values = np.arange(15, dtype=np.float32).reshape(3, 5)
    h = np.arange(30, dtype=np.float32).reshape(3, 5, 2)
    m, v, hh = training.compact_positions(mask, mask, values, h)
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(v, [[1, 3, 4, 0, 2], [5, 9, 6, 7, 8], [10, 11, 12, 13, 14]])
    np.testing.assert_array_equal(hh, h[np.arange(3)[:, None], np.asarray(v, int) % 5])


def test_compact_positions_gradient_is_the_inverse_permutation():
    rng = np.random.default_rng(3)
    mask = jnp.asarray(rng.integers(0, 2, (3, 6)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)

    def ours(h):
        return jnp.sum(training.compact_positions(mask, h)[0] * weights)

    def plain(h):  # take_along_axis's own autodiff: a scatter-add
        order = jnp.argsort(mask == 0, axis=1, stable=True)
        return jnp.sum(jnp.take_along_axis(h, order[..., None], axis=1) * weights)

    np.testing.assert_allclose(jax.grad(ours)(h), jax.grad(plain)(h), rtol=0, atol=0)


def _has_cond(fn, *args):
    return "cond[" in str(jax.make_jaxpr(fn)(*args))


def test_unscored_chunks_are_skipped_only_up_to_the_device_limit(monkeypatch):
    h, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    targets, mask = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))

    def total(h, w):
        return jnp.sum(training.chunk_logps(h, w, targets, mask))

    monkeypatch.setattr(training, "SKIP_MAX_DEVICES", jax.device_count() - 1)
    assert not _has_cond(jax.grad(total, (0, 1)), h, w)
    monkeypatch.setattr(training, "SKIP_MAX_DEVICES", jax.device_count())
    assert _has_cond(total, h, w) and _has_cond(jax.grad(total, (0, 1)), h, w)


@pytest.mark.usefixtures("skipping")
@pytest.mark.parametrize("vocab_major", [False, True])
def test_chunk_logps_skips_an_unscored_chunk_and_takes_either_layout(vocab_major):
    """A chunk whose mask is all 0 scores 0 with zero gradients; a scored one equals the
    plain log-softmax in value and gradients, with the output layer ``[D,V]`` or ``[V,D]``."""
    rng = np.random.default_rng(11)
    h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 13)) * 0.3, jnp.float32)  # [D,V]
    targets = jnp.asarray(rng.integers(0, 13, (2, 5)), jnp.int32)
    stored = w.T if vocab_major else w

    def total(h, stored, mask):
        return jnp.sum(training.chunk_logps(h, stored, targets, mask, vocab_major))

    def plain(h, w, mask):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)

    mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1.0)
    value, (dh, dw) = jax.value_and_grad(total, argnums=(0, 1))(h, stored, mask)
    want, (want_dh, want_dw) = jax.value_and_grad(plain, argnums=(0, 1))(h, w, mask)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw.T if vocab_major else dw, want_dw, rtol=1e-5, atol=1e-6)

    zeros = jnp.zeros((2, 5), jnp.float32)
    per_row = training.chunk_logps(h, stored, targets, zeros, vocab_major)
    dh, dw = jax.grad(total, argnums=(0, 1))(h, stored, zeros)
    assert not np.any(per_row) and not np.any(dh) and not np.any(dw)
    assert dw.shape == stored.shape


@pytest.mark.parametrize("tied", [True, False])
def test_the_output_layer_as_stored_projects_to_the_model_s_logits(tied):
    config = TINY.replace(tie_embeddings=tied)
    model = Transformer(config, rngs=nnx.Rngs(2))
    w, vocab_major = model.output_layer()
    assert vocab_major is tied
    assert w.shape == ((config.vocab_size, config.hidden_size) if tied else (32, 96))
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 32)), jnp.float32)
    np.testing.assert_allclose(project(h, w, vocab_major), model.logits(h), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("skip", [False, True])
def test_log_probs_of_rows_with_long_prompts_skip_no_scored_token(model, skip, request):
    """Prompts longer than a chunk (the output layer then skips chunks) and a row with no
    scored token: the sums still equal the full log-softmax's."""
    if skip:
        request.getfixturevalue("skipping")
    rng = np.random.default_rng(5)
    t = 24
    ids = rng.integers(1, TINY.vocab_size, (4, t)).astype(np.int32)
    lengths, prompts = np.asarray([24, 20, 17, 12]), np.asarray([15, 13, 16, 12])
    cols = np.arange(t)[None]
    attention = (cols < lengths[:, None]).astype(np.int32)
    loss_mask = (attention * (cols >= prompts[:, None])).astype(np.int32)
    got, n = training.sequence_logps(model, ids, attention, loss_mask, chunk_size=4)
    want, want_n = _naive_logps(model, ids, attention, loss_mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(n, want_n)
    assert got[3] == 0 and n[3] == 0
