"""Reward-model judges: a model folder scores (prompt, response) as transformers does; rule
judges by name; errors for folders that are not reward models."""

import pytest

from jaxalign.judging import AnswerChecker
from jaxalign.reward_judge import load_reward_judge

torch = pytest.importorskip("torch")


class CharTokenizer:
    pad_token_id = 0  # the pad id of conftest's torch_reward_dir

    def encode_prompt(self, prompt, use_chat_template=True):
        return [1] + [3 + (ord(c) % 60) for c in prompt]

    def encode_response(self, text, add_eos=True):
        return [3 + (ord(c) % 60) for c in text] + ([2] if add_eos else [])


def test_judge_scores_prompt_and_response(torch_reward_dir):
    folder, ref = torch_reward_dir
    tok = CharTokenizer()
    judge = load_reward_judge(str(folder), tokenizer=tok, batch_size=2)
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
    assert isinstance(load_reward_judge("demo-checker"), AnswerChecker)
    with pytest.raises(ValueError, match="neither a registered rule judge"):
        load_reward_judge(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"vocab_size": 8}')
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_reward_judge(str(tmp_path))
