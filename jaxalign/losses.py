"""Pairwise preference losses and reward-weighted SFT, all on per-sequence log-probs.

Every loss takes per-pair log-prob sums (``[B]``, summed over response tokens),
a per-pair ``weight [B]`` (0 marks a padding pair) and a per-pair label
``smoothing [B]`` (the probability that the pair's label is flipped), and
returns ``(loss, aux)``:

- ``loss`` is the weighted mean ``sum(w·ℓ) / max(sum(w), ε)`` (see
  :func:`weighted_mean`), so a pair with ``w = 0`` contributes exactly nothing,
  neither to the value nor to the gradient;
- ``aux`` is a dict of scalar metrics with namespaced names
  (``rewards/chosen``, ``rewards/margin``, ``logps/chosen``, ...), each a
  weighted mean over the same pairs.

Notation: ``π`` the policy, ``π_ref`` the reference, ``c``/``r`` the chosen and
rejected responses, ``Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))``
the log-ratio margin, ``β`` the KL strength, ``α_i`` pair ``i``'s smoothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]

WEIGHT_EPS = 1e-8  # the ε in sum(w·ℓ) / max(sum(w), ε): an all-padding batch gives loss 0


def weighted_mean(values: Array, weight: Array, eps: float = WEIGHT_EPS) -> Array:
    """``sum(w·v) / max(sum(w), ε)`` over the leading axis. ``values, weight: [B]``."""
    weight = weight.astype(jnp.float32)
    return jnp.sum(weight * values.astype(jnp.float32)) / jnp.maximum(jnp.sum(weight), eps)


def log_ratio_margin(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
) -> Array:
    """``Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))``, all ``[B]``."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def preference_metrics(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    weight: Array,
    beta: float,
) -> Metrics:
    """Implicit-reward metrics (Rafailov et al. 2023, eq. 5).

    ``r(y) = β·(log π(y) − log π_ref(y))``;
    ``rewards/accuracy`` is the weighted fraction of pairs with ``r(c) > r(r)``.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margin = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": weighted_mean(chosen_rewards, weight),
        "rewards/rejected": weighted_mean(rejected_rewards, weight),
        "rewards/margin": weighted_mean(margin, weight),
        "rewards/accuracy": weighted_mean((margin > 0).astype(jnp.float32), weight),
        "logps/chosen": weighted_mean(policy_chosen_logps, weight),
        "logps/rejected": weighted_mean(policy_rejected_logps, weight),
        "logps/ref_chosen": weighted_mean(ref_chosen_logps, weight),
        "logps/ref_rejected": weighted_mean(ref_rejected_logps, weight),
    }


def dpo_sigmoid_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    weight: Array,
    smoothing: Array,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """DPO (Rafailov et al. 2023, eq. 7) with per-pair label smoothing (conservative DPO).

    ``ℓ_i = −(1−α_i)·log σ(βΔ_i) − α_i·log σ(−βΔ_i)``: the expected DPO loss when
    pair ``i``'s label is flipped with probability ``α_i`` (Mitchell 2023, "A note
    on DPO with noisy preferences"); ``α_i = 0`` is plain DPO. SPA's self-refinement
    sets ``α_i = α·z_i`` for flagged pairs (Kim et al. 2024, eq. 9).
    """
    delta = log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * delta
    per_pair = -(1.0 - smoothing) * jax.nn.log_sigmoid(logits) - smoothing * jax.nn.log_sigmoid(
        -logits
    )
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return weighted_mean(per_pair, weight), preference_metrics(*logps, weight, beta)


def ipo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    weight: Array,
    smoothing: Array,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17).

    ``ℓ_i = (1−α_i)·(Δ_i − 1/(2β))² + α_i·(Δ_i + 1/(2β))²``: the squared regression
    of the log-ratio margin onto ``1/(2β)`` (``β`` is the paper's ``τ``), with the
    same label-flip expectation as :func:`dpo_sigmoid_loss` (a flipped pair's
    target is ``−1/(2β)``). The paper averages log-probs over tokens; pass
    length-normalised log-probs for that form.
    """
    delta = log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    target = 1.0 / (2.0 * beta)
    per_pair = (1.0 - smoothing) * (delta - target) ** 2 + smoothing * (delta + target) ** 2
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return weighted_mean(per_pair, weight), preference_metrics(*logps, weight, beta)


def hinge_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    weight: Array,
    smoothing: Array,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """Hinge loss on the scaled margin (SLiC-HF, Zhao et al. 2023, eq. 2).

    ``ℓ_i = (1−α_i)·max(0, 1 − βΔ_i) + α_i·max(0, 1 + βΔ_i)``.
    """
    delta = log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * delta
    per_pair = (1.0 - smoothing) * jax.nn.relu(1.0 - logits) + smoothing * jax.nn.relu(1.0 + logits)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return weighted_mean(per_pair, weight), preference_metrics(*logps, weight, beta)


def robust_dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    weight: Array,
    smoothing: Array,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 8).

    ``ℓ_i = [−(1−ε_i)·log σ(βΔ_i) + ε_i·log σ(−βΔ_i)] / (1 − 2ε_i)``, with the
    flip rate ``ε_i = α_i`` (must be < 1/2). Unlike :func:`dpo_sigmoid_loss` this is
    an unbiased estimate of the clean-label loss: its expectation under label
    flips with rate ``ε`` equals the DPO loss on the true labels.
    """
    delta = log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * delta
    per_pair = (
        -(1.0 - smoothing) * jax.nn.log_sigmoid(logits) + smoothing * jax.nn.log_sigmoid(-logits)
    ) / (1.0 - 2.0 * smoothing)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return weighted_mean(per_pair, weight), preference_metrics(*logps, weight, beta)


def ranking_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_num_tokens: Array,
    rejected_num_tokens: Array,
    weight: Array,
    smoothing: Array,
    margin: float = 0.0,
) -> tuple[Array, Metrics]:
    """Reference-free ranking loss on length-normalised log-probs (RRHF, Yuan et al. 2023, eq. 2).

    ``p(y) = log π(y) / |y|`` (mean token log-prob), ``d_i = p(c_i) − p(r_i)``,
    ``ℓ_i = (1−α_i)·max(0, m − d_i) + α_i·max(0, m + d_i)``; RRHF uses ``m = 0``.
    PLE's ranking loss for pairs whose reward gap exceeds its threshold
    (Liu et al. 2024) takes this form. ``*_num_tokens [B]``: response lengths
    (clamped to ≥ 1, so an empty response scores 0).
    """
    chosen_scores = chosen_logps / jnp.maximum(chosen_num_tokens, 1)
    rejected_scores = rejected_logps / jnp.maximum(rejected_num_tokens, 1)
    diff = chosen_scores - rejected_scores
    per_pair = (1.0 - smoothing) * jax.nn.relu(margin - diff) + smoothing * jax.nn.relu(
        margin + diff
    )
    aux = {
        "ranking/chosen_score": weighted_mean(chosen_scores, weight),
        "ranking/rejected_score": weighted_mean(rejected_scores, weight),
        "ranking/margin": weighted_mean(diff, weight),
        "ranking/accuracy": weighted_mean((diff > 0).astype(jnp.float32), weight),
        "logps/chosen": weighted_mean(chosen_logps, weight),
        "logps/rejected": weighted_mean(rejected_logps, weight),
    }
    return weighted_mean(per_pair, weight), aux


def weighted_sft_loss(logps: Array, num_tokens: Array, weight: Array) -> tuple[Array, Metrics]:
    """Reward-weighted supervised fine-tuning: weighted per-example token-mean NLL.

    ``ℓ_j = −log π(y_j|x_j) / |y_j|`` and ``L = sum(w_j·ℓ_j) / max(sum(w_j), ε)``,
    ``logps, num_tokens, weight: [B]``. PLE's loss for response pairs whose reward
    gap is below its threshold, each response weighted by its normalised reward
    (Liu et al. 2024); the weighted-likelihood form is RAFT/RWR's (Dong et al. 2023).
    """
    nll = -logps / jnp.maximum(num_tokens, 1)
    aux = {
        "sft/nll": weighted_mean(nll, weight),
        "sft/logps": weighted_mean(logps, weight),
        "sft/weight_sum": jnp.sum(weight.astype(jnp.float32)),
    }
    return weighted_mean(nll, weight), aux


PreferenceLoss = Callable[..., tuple[Array, Metrics]]

# The reference-based pairwise losses, by TrainConfig.loss name; all share one signature.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_dpo_loss,
}
