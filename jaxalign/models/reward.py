"""A scalar reward model: the Llama backbone plus a linear ``score`` head, and its judge.

``r(x, y) = h_last · w``: ``h [B,T,D]`` are the backbone's final-norm hidden
states (:meth:`jaxalign.models.llama.Transformer.hidden_states`), ``w = score [D]``
(Hugging Face ``score.weight [1, D]``), read at each row's last real token, which
is what transformers' ``LlamaForSequenceClassification`` does (it takes the last
token that is not ``pad_token_id``; here the attention mask says which tokens
are real, so a pad id inside the text cannot confuse it).

Weights load from a local Hugging Face sequence-classification folder
(``config.json`` + safetensors with ``model.*`` and ``score.weight``), e.g. one
saved by ``LlamaForSequenceClassification.save_pretrained``. The backbone is
built with ``tie_embeddings=True`` so that no ``lm_head`` is needed: the
classifier has none, and its logits are never computed.

:class:`RewardModelJudge` gives a reward model the judges' interface
(``scores = judge(prompts, responses, records, finished=...)``), so PLE's reward
can be a model folder or a rule judge from :data:`jaxalign.judging.RULE_JUDGES`
(:func:`load_reward_judge`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxalign import judging
from jaxalign.data.pairs import bucket_length
from jaxalign.models.llama import Transformer, positions_from_mask
from jaxalign.weights.hf import read_hf_config
from jaxalign.weights.layout import WeightsError, model_from_params, params_from_hf


class RewardModel(nnx.Module):
    """``RewardModel(backbone, score)``: ``score [D, 1]`` read at the last real token."""

    def __init__(self, backbone: Transformer, score: jax.Array):
        self.backbone = backbone
        self.score = nnx.Param(
            jnp.asarray(score), sharding_names=("embed", None), eager_sharding=False
        )

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """``tokens, attention_mask [B,T]`` (any padding side) → rewards ``[B]`` float32."""
        positions = positions_from_mask(attention_mask)
        hidden, _ = self.backbone.hidden_states(tokens, positions, attention_mask)
        t = jnp.arange(tokens.shape[1])
        last = jnp.argmax(jnp.where(attention_mask > 0, t, -1), axis=-1)  # [B]
        h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        w = self.score.get_value().astype(jnp.float32)
        return (h_last.astype(jnp.float32) @ w)[:, 0]


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"{folder}: no safetensors files; save the reward model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    out = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            out.update({name: file for name in f.keys()})
    return out


def load_reward_model(
    path: str | Path, *, param_dtype: str = "float32", dtype: str = "float32"
) -> RewardModel:
    """Loads a Hugging Face Llama-family sequence-classification folder (1 label)."""
    folder = Path(path)
    cfg = read_hf_config(folder, param_dtype=param_dtype, dtype=dtype, tie_embeddings=True)
    hf = json.loads((folder / "config.json").read_text())
    labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 1
    if labels != 1:
        raise WeightsError(
            f"{folder}/config.json: a reward model has one output, this one has {labels} labels"
        )
    files = _tensor_files(folder)

    def get_tensor(name: str) -> np.ndarray:
        with safe_open(str(files[name]), framework="numpy") as f:
            return f.get_tensor(name)

    if "score.weight" not in files:
        raise WeightsError(
            f"{folder}: no 'score.weight' tensor; is this a sequence-classification "
            "(reward) model rather than a causal LM?"
        )
    score = get_tensor("score.weight")
    if score.shape != (1, cfg.hidden_size):
        raise WeightsError(
            f"{folder}: score.weight has shape {score.shape}, expected (1, {cfg.hidden_size})"
        )
    backbone = model_from_params(cfg, params_from_hf(cfg, get_tensor, str(folder)))
    param = np.dtype("float32") if param_dtype == "float32" else jnp.dtype(param_dtype)
    return RewardModel(backbone, score.T.astype(param))


@nnx.jit
def _score_batch(model: RewardModel, tokens, attention_mask):
    return model(tokens, attention_mask)


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
        pad = int(getattr(self.tokenizer, "pad_token_id", 0) or 0)
        limit = self.max_prompt_tokens + self.max_response_tokens
        out = np.zeros(len(rows), np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            members = order[start : start + self.batch_size]
            length = bucket_length(max(len(rows[i]) for i in members), limit)
            ids = np.full((self.batch_size, length), pad, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            mask[:, 0] = 1  # padding rows see one token, so nothing divides by zero
            for j, i in enumerate(members):
                ids[j, : len(rows[i])] = rows[i]
                mask[j, : len(rows[i])] = 1
            scores = np.asarray(_score_batch(self.model, jnp.asarray(ids), jnp.asarray(mask)))
            out[members] = scores[: len(members)]
        return out


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
        from jaxalign.tokenizer import Tokenizer

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
