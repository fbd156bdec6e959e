"""Packed pair batches: the layout, and the same log-probs, losses and steps as unpacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_training import CONFIG, STEPS, TINY, make_batch

from jaxalign import parallel, refinement, training
from jaxalign.data.packing import pack_pair_rows, packed_row_multiple
from jaxalign.models.llama import Transformer

B, T = 8, 16


def _short_batch(seed, b=B, t=T, padding_pairs=2):
    """A batch whose sequences are mostly shorter than half the row, the last
    ``padding_pairs`` pairs weight-0 padding with no tokens, as the pair builder makes them."""
    batch = make_batch(seed, b, t)
    rng = np.random.default_rng(seed)
    for side in ("chosen", "rejected"):
        lengths = rng.integers(4, t // 2 + 2, b)
        lengths[b - padding_pairs :] = 0
        cols = np.arange(t)[None]
        keep = (cols < lengths[:, None]).astype(np.int32)
        batch[f"{side}_ids"] = batch[f"{side}_ids"] * keep
        batch[f"{side}_attention_mask"] = keep
        prompt = np.minimum(2, lengths)[:, None]
        batch[f"{side}_loss_mask"] = keep * (cols >= prompt)
    batch["weight"][b - padding_pairs :] = 0.0
    return batch


def test_packing_places_every_token_once_in_fewer_rows():
    batch = _short_batch(1)
    packed = pack_pair_rows(batch)
    seg, ids = packed["packed_segments"], packed["packed_ids"]
    assert "chosen_ids" not in packed and packed["weight"] is batch["weight"]
    rows = seg.shape[0]
    assert seg.shape == ids.shape == (rows, T) and rows < 2 * B
    for k, side in enumerate(("chosen", "rejected")):
        for i in range(B):
            n = int(batch[f"{side}_attention_mask"][i].sum())
            where = np.argwhere(seg == k * B + i)
            assert len(where) == n  # each token exactly once, padding pairs nowhere
            if not n:
                continue
            row = where[0, 0]
            assert (where[:, 0] == row).all()  # one sequence stays in one row, contiguous
            cols = where[:, 1]
            np.testing.assert_array_equal(cols, np.arange(cols[0], cols[0] + n))
            np.testing.assert_array_equal(ids[row, cols], batch[f"{side}_ids"][i, :n])
            np.testing.assert_array_equal(packed["packed_positions"][row, cols], np.arange(n))
            np.testing.assert_array_equal(
                packed["packed_loss_mask"][row, cols], batch[f"{side}_loss_mask"][i, :n]
            )
    assert not packed["packed_loss_mask"][seg < 0].any()


def test_the_packed_row_count_is_rounded_and_bounded():
    batch = _short_batch(2)
    need = pack_pair_rows(batch)["packed_ids"].shape[0]
    assert pack_pair_rows(batch, 4)["packed_ids"].shape[0] == -(-need // 4) * 4
    full = make_batch(3)  # every sequence the whole row: no two share one
    for side in ("chosen", "rejected"):
        full[f"{side}_attention_mask"][:, :] = 1
    assert pack_pair_rows(full, 4)["packed_ids"].shape[0] == 2 * B
    assert packed_row_multiple(8) == 4 and packed_row_multiple(8, shards=8) == 8
    assert packed_row_multiple(1) == 1 and packed_row_multiple(5) == 5  # divides 10 rows
    assert packed_row_multiple(32, shards=2) == 16 and packed_row_multiple(32, shards=3) == 64
    with pytest.raises(ValueError, match="row_multiple 5 does not divide"):
        pack_pair_rows(full, 5)
    with pytest.raises(ValueError, match="needs rejected_loss_mask"):
        pack_pair_rows({k: v for k, v in full.items() if k != "rejected_loss_mask"})
    gap = make_batch(4)
    gap["chosen_attention_mask"][0, :3] = [1, 0, 1]
    with pytest.raises(ValueError, match="chosen row 0 is not right-padded"):
        pack_pair_rows(gap)


@pytest.fixture(scope="module")
def model():
    return Transformer(TINY, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("chunk", [5, 64])
def test_packed_pair_logps_equal_unpacked(model, chunk):
    batch = _short_batch(5)
    want = training.pair_logps(model, jax.tree.map(jnp.asarray, batch), chunk)
    got = training.pair_logps(model, jax.tree.map(jnp.asarray, pack_pair_rows(batch)), chunk)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    assert not np.any(want[0][-2:]) and not np.any(got[2][-2:])  # padding pairs score 0


def _one_device():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _step(model, loss_fn, frozen_shardings=None, algo_state=None):
    mesh = _one_device()
    graphdef, state, shardings = training.create_train_state(
        model, CONFIG, STEPS, mesh, algo_state=algo_state
    )
    step = training.make_train_step(
        graphdef,
        CONFIG,
        mesh,
        loss_fn(graphdef),
        shardings,
        total_steps=STEPS,
        frozen_shardings=frozen_shardings,
    )
    return state, step


def _assert_same_step(a, b):
    (state_a, m_a), (state_b, m_b) = a, b
    for key in m_a:
        np.testing.assert_allclose(m_a[key], m_b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # Adam divides by the gradient's scale: a rounding-sized gradient difference moves a
    # parameter by a rounding-sized share of the step (lr 1e-3), hence atol 1e-5.
    for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_a_packed_dpo_step_is_the_unpacked_step(model):
    """Precomputed reference log-probs, two steps: the same metrics and parameters."""
    batches = [_short_batch(6), _short_batch(7, padding_pairs=0)]
    results = []
    for pack in (False, True):
        state, step = _step(model, lambda g: training.dpo_loss_fn(CONFIG))
        for batch in batches:
            state, m = step(state, pack_pair_rows(batch, 4) if pack else batch)
        results.append((state, jax.device_get(m)))
    _assert_same_step(*results)


def test_a_packed_spa_step_is_the_unpacked_step(model):
    """SPA's refinement loss with its on-the-fly reference: the same margins, flags,
    loss and update from packed rows."""
    reference = Transformer(TINY, rngs=nnx.Rngs(3))
    ref_params = nnx.state(reference)
    frozen = parallel.model_shardings(ref_params, _one_device())

    def loss(graphdef):
        return refinement.spa_loss_fn(
            graphdef, beta=0.1, lam=0.5, quantile=0.3, alpha=0.2, flag_after_step=1, chunk_size=5
        )

    batches = [_short_batch(s) for s in (8, 9, 10)]
    for batch in batches:
        for name in training.REFERENCE_FIELDS:
            batch.pop(name)
    results = []
    for pack in (False, True):
        state, step = _step(model, loss, frozen, refinement.init_margin_buffer(16))
        for batch in batches:
            state, m = step(state, pack_pair_rows(batch) if pack else batch, ref_params)
        results.append((state, jax.device_get(m)))
    _assert_same_step(*results)
    assert results[1][1]["spa/flagging_active"] == 1.0


def test_best_fit_places_longest_first_into_the_fullest_row_that_holds_it():
    from jaxalign.data.packing import best_fit

    # longest first: 7 -> new row 0 (room 3); 6 -> new row 1 (room 4); 4 -> row 1 (the
    # only room that holds it); the first 3 -> row 0 (room 3, fills it); the second 3 ->
    # new row 2; 1 -> row 2 (rows 0 and 1 are full)
    placed, rows = best_fit([3, 7, 1, 6, 3, 4], 10)
    assert rows == 3
    assert placed == [(0, 7), (0, 0), (2, 3), (1, 0), (2, 0), (1, 6)]
    lengths = np.random.default_rng(0).integers(1, 65, 500).tolist()
    placed, rows = best_fit(lengths, 64)
    used = np.zeros((rows, 64), int)
    for n, (row, start) in zip(lengths, placed, strict=True):
        used[row, start : start + n] += 1
    assert used.max() == 1 and used.sum() == sum(lengths)  # no overlap, nothing lost
    assert rows <= -(-sum(lengths) * 11 // (9 * 64)) + 1  # within 11/9 of the bound
    with pytest.raises(ValueError, match="does not fit rows of 10"):
        best_fit([4, 11], 10)


def test_the_cheapest_layout_by_hand():
    from jaxalign.data.packing import cheapest_layout, row_layouts

    assert row_layouts(8, 4) == [(8, 4), (16, 2), (32, 1)]
    assert row_layouts(8, 6) == [(8, 6), (16, 3)]  # 4 does not divide 6 rows
    # six sequences of 5 in rows of 8 (one each: 4 + 2 rows, 48 positions), of 16 (three
    # each: 2 rows, 32) or of 32 (six: 1 row, 32)
    flat = [[5] * 6]
    assert cheapest_layout(flat, 8, 4, lambda length: 1.0) == (16, 2)  # ties: shorter rows
    assert cheapest_layout(flat, 8, 4, lambda length: length) == (8, 4)  # 384 < 512 < 1024
    # each group packs on its own: two groups of three 5s take 3 rows of 8 each (48
    # positions), 1 row of 16 each (32) or 1 row of 32 each (64)
    assert cheapest_layout([[5] * 3, [5] * 3], 8, 4, lambda length: 1.0) == (16, 2)


def test_longer_rows_hold_a_batch_in_fewer_rows_and_no_more_than_the_cap():
    batch = _short_batch(2)
    for side in ("chosen", "rejected"):  # every sequence longer than half a row
        batch[f"{side}_attention_mask"][:] = 1
        batch[f"{side}_attention_mask"][:, T - 3 :] = 0
        batch[f"{side}_loss_mask"] *= batch[f"{side}_attention_mask"]
    batch["weight"][:] = 1.0
    assert pack_pair_rows(batch)["packed_ids"].shape == (2 * B, T)  # one to a row of T
    wide = pack_pair_rows(batch, 1, 2 * T, max_rows=B)
    assert wide["packed_ids"].shape == (B, 2 * T)  # two to a row of 2T
    assert sorted(np.unique(wide["packed_segments"])) == list(range(-1, 2 * B))
    with pytest.raises(ValueError, match="need 8 rows of 32, more than 4"):
        pack_pair_rows(batch, 1, 2 * T, max_rows=4)
