"""Reward-model judges: a scalar reward model behind the judges' interface.

:class:`RewardModelJudge` scores ``(prompt, response)`` pairs as every judge does
(``scores = judge(prompts, responses, records, finished=...)``,
:class:`jaxalign.judging.ResponseScorer`), so PLE's reward and the gold judge of
evaluation can be a model folder or a rule judge from :data:`jaxalign.judging.RULE_JUDGES`
(:func:`load_reward_judge`). The model is :class:`jaxalign.models.reward.RewardModel`,
loaded by :func:`jaxalign.weights.reward.load_reward_model`; its batched forward pass
is :func:`jaxalign.scoring.reward_scores`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxalign import judging
from jaxalign.data.pairs import pad_token_id
from jaxalign.models.reward import RewardModel
from jaxalign.scoring import reward_scores
from jaxalign.tokenizer import Tokenizer
from jaxalign.weights.reward import load_reward_model


class RewardModelJudge:
    """A reward model behind the judges' interface: ``judge(prompts, responses, records)``.

    Each ``(prompt, response)`` is tokenised as training rows are (chat-templated
    prompt, left-truncated to ``max_prompt_tokens``; the response plus its
    end-of-turn token when it ``finished``, cut to ``max_response_tokens``),
    right-padded to power-of-two buckets, and scored ``batch_size`` rows at a time.
    """

    def __init__(
        self,
        model: RewardModel,
        tokenizer,
        *,
        batch_size: int = 16,
        max_prompt_tokens: int = 512,
        max_response_tokens: int = 512,
        use_chat_template: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.use_chat_template = use_chat_template

    def _ids(self, prompt, response: str, finished: bool) -> list[int]:
        p = self.tokenizer.encode_prompt(prompt, use_chat_template=self.use_chat_template)
        p = p[max(len(p) - self.max_prompt_tokens, 0) :]
        r = self.tokenizer.encode_response(response, add_eos=finished)[: self.max_response_tokens]
        return p + r

    def __call__(
        self,
        prompts: Sequence,
        responses: Sequence[str],
        records: Sequence[dict] | None = None,
        finished: Sequence[bool] | None = None,
    ) -> np.ndarray:
        finished = [True] * len(responses) if finished is None else finished
        rows = [
            self._ids(p, r, bool(f)) for p, r, f in zip(prompts, responses, finished, strict=True)
        ]
        return reward_scores(
            self.model,
            rows,
            pad_id=pad_token_id(self.tokenizer),
            batch_size=self.batch_size,
            max_length=self.max_prompt_tokens + self.max_response_tokens,
        )


def load_reward_judge(
    name: str,
    *,
    tokenizer=None,
    batch_size: int = 16,
    max_prompt_tokens: int = 512,
    max_response_tokens: int = 512,
    use_chat_template: bool = True,
    param_dtype: str = "float32",
    dtype: str = "float32",
) -> judging.ResponseScorer:
    """A rule judge by name (:data:`jaxalign.judging.RULE_JUDGES`) or a reward-model folder.

    A folder's own tokenizer is used when it has one, else ``tokenizer``.
    """
    if name in judging.RULE_JUDGES:
        return judging.get_rule_judge(name)
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(
            f"reward {name!r} is neither a registered rule judge "
            f"({', '.join(sorted(judging.RULE_JUDGES))}) nor a folder holding a Hugging Face "
            "sequence-classification model"
        )
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        tokenizer = Tokenizer.from_pretrained(folder)
    elif tokenizer is None:
        raise ValueError(f"{folder}: no tokenizer files; save the reward model's tokenizer there")
    model = load_reward_model(folder, param_dtype=param_dtype, dtype=dtype)
    return RewardModelJudge(
        model,
        tokenizer,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        use_chat_template=use_chat_template,
    )
