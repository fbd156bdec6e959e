"""Reward model: parity with transformers' LlamaForSequenceClassification, and the judge."""

import numpy as np
import pytest

from jaxalign.judging import AnswerChecker
from jaxalign.models import reward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD = 0


class CharTokenizer:
    pad_token_id = PAD

    def encode_prompt(self, prompt, use_chat_template=True):
        return [1] + [3 + (ord(c) % 60) for c in prompt]

    def encode_response(self, text, add_eos=True):
        return [3 + (ord(c) % 60) for c in text] + ([2] if add_eos else [])


@pytest.fixture(scope="module")
def torch_reward_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=PAD,
        rms_norm_eps=1e-6,
    )
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # a random, non-trivial head and norms
        model.score.weight.normal_(0, 0.5)
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("reward")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_parity_with_transformers(torch_reward_dir):
    folder, ref = torch_reward_dir
    ours = reward.load_reward_model(folder)
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


def test_judge_scores_prompt_and_response(torch_reward_dir):
    folder, ref = torch_reward_dir
    tok = CharTokenizer()
    judge = reward.load_reward_judge(str(folder), tokenizer=tok, batch_size=2)
    prompts = ["hi there", "what?", "a much longer question here", "x"]
    responses = ["hello", "nothing at all", "ok", "y"]
    finished = [True, False, True, True]
    got = judge(prompts, responses, None, finished=finished)
    for p, r, f, g in zip(prompts, responses, finished, got, strict=True):
        row = tok.encode_prompt(p) + tok.encode_response(r, add_eos=f)
        with torch.no_grad():
            want = ref(torch.tensor([row])).logits[0, 0].item()
        assert abs(g - want) <= 1e-4


def test_rule_judges_and_errors(tmp_path):
    assert isinstance(reward.load_reward_judge("demo-checker"), AnswerChecker)
    with pytest.raises(ValueError, match="neither a registered rule judge"):
        reward.load_reward_judge(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"vocab_size": 8}')
    with pytest.raises(ValueError, match="no tokenizer files"):
        reward.load_reward_judge(str(tmp_path))
