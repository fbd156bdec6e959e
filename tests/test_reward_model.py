"""Reward model: parity with transformers' LlamaForSequenceClassification, read from its folder."""

import numpy as np
import pytest

from jaxalign.weights.reward import load_reward_model

torch = pytest.importorskip("torch")

PAD = 0  # the pad id of conftest's torch_reward_dir


def test_parity_with_transformers(torch_reward_dir):
    folder, ref = torch_reward_dir
    ours = load_reward_model(folder)
    rng = np.random.default_rng(0)
    lengths = [12, 5, 9, 1]
    ids = np.full((4, 12), PAD, np.int64)
    mask = np.zeros((4, 12), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 64, n)
        mask[i, :n] = 1
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    got = np.asarray(ours(ids.astype(np.int32), mask.astype(np.int32)))
    err = np.abs(got - want).max()
    assert err <= 1e-4, err
    # Left padding reads the same last token: same rewards.
    left_ids, left_mask = np.full_like(ids, PAD), np.zeros_like(mask)
    for i, n in enumerate(lengths):
        left_ids[i, 12 - n :] = ids[i, :n]
        left_mask[i, 12 - n :] = 1
    got_left = np.asarray(ours(left_ids.astype(np.int32), left_mask.astype(np.int32)))
    np.testing.assert_allclose(got_left, want, atol=1e-4)
