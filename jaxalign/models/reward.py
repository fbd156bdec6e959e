"""A scalar reward model: the Llama backbone plus a linear ``score`` head.

``r(x, y) = h_last · w``: ``h [B,T,D]`` are the backbone's final-norm hidden
states (:meth:`jaxalign.models.llama.Transformer.hidden_states`), ``w = score [D]``
(Hugging Face ``score.weight [1, D]``), read at each row's last real token, which
is what transformers' ``LlamaForSequenceClassification`` does (it takes the last
token that is not ``pad_token_id``; here the attention mask says which tokens
are real, so a pad id inside the text cannot confuse it).

Weights load from a Hugging Face sequence-classification folder with
:func:`jaxalign.weights.reward.load_reward_model`; :mod:`jaxalign.reward_judge` puts
the model behind the judges' interface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.llama import Transformer, positions_from_mask


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
