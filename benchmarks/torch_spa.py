"""A torch peer of one SPA round, done as the SPA authors' code does it on one machine.

Kim et al., "Aligning Large Language Models with Self-generated Preference Data"
(arXiv 2406.04412). Round ``i ≥ 1`` starts from ``π_{i-1}`` and the SFT model ``π_init``:

1. **sample**: transformers ``generate`` draws ``n`` responses per prompt from ``π_{i-1}``
   (``do_sample``, temperature 0.7, top-p 1.0), a batch of prompts at a time;
2. **judge**: forward passes give each response's summed log-probs under ``π_{i-1}`` and
   ``π_init``; the implicit reward is ``r(x,y) = β·(log π_{i-1}(y|x) − log π_init(y|x))``
   (optionally divided by the response's token count), and of a prompt's two responses
   the higher-reward one is ``chosen``;
3. **train**: a plain torch loop (AdamW, linear warm-up then cosine decay, gradient
   clipping) trains ``π_i`` from ``π_{i-1}`` against a frozen copy of ``π_{i-1}`` run on the
   fly, with SPA's self-refinement loss (:func:`spa_refinement_loss`).

Only ``benchmarks/spa_round.py`` uses this module, in a worker process of its own, so
torch and jaxalign never share a process; the ``jaxalign`` package never imports torch.
Everything runs in float32 on the CPU.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """The round's settings, taken from the jaxalign config the other side ran."""

    samples_per_prompt: int = 2  # spa.samples_per_prompt
    temperature: float = 0.7  # sampling.temperature
    top_p: float = 1.0  # sampling.top_p
    top_k: int = 0  # sampling.top_k (0: off)
    max_new_tokens: int = 300  # sampling.max_new_tokens
    generate_batch_size: int = 16  # run.generate_batch_size: prompts per generate call
    max_response_tokens: int = 300  # data.max_response_tokens: responses are cut to this
    judge_reward: str = "sum"  # spa.judge_reward: "sum" (paper) or "mean" over tokens
    beta: float = 0.1  # train.beta
    lam: float = 0.5  # spa.lambda_for_round(i): λ of the extrapolated logits
    margin_window: int = 50  # spa.margin_window
    noise_quantile: float = 0.1  # spa.noise_quantile
    smoothing_alpha: float = 0.1  # spa.smoothing_alpha
    flag_warmup_ratio: float = 0.2  # spa.flag_warmup_ratio
    batch_size: int = 32  # train.batch_size (pairs per step)
    epochs: int = 1  # spa.round_epochs
    learning_rate: float = 5e-7  # train.learning_rate
    warmup_ratio: float = 0.1  # train.warmup_ratio
    schedule: str = "cosine"  # train.schedule
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0  # sampling: torch.manual_seed(seed); training order: default_rng(seed)


Response = tuple[list[int], bool]  # (generated ids, EOS included when produced; finished)


def load_causal_lm(folder: str, gguf_file: str | None = None):
    """A transformers causal LM in float32, in eval mode: from a Hugging Face folder, or from
    ``folder/gguf_file`` (transformers dequantises the GGUF itself)."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model counts as quantised and refuses .float(); check the dtype instead.
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"{folder}: expected float32 weights, got {sorted(map(str, dtypes))}")
    return model.eval()


# ----------------------------------------------------------------------------- 1. sample


def first_response(new_ids: Sequence[int], eos_ids: Iterable[int]) -> Response:
    """A generated row cut after its first end token: ``(ids, finished)``; a row without one
    is kept whole (it hit ``max_new_tokens``)."""
    ends = set(eos_ids)
    for k, t in enumerate(new_ids):
        if t in ends:
            return [int(x) for x in new_ids[: k + 1]], True
    return [int(x) for x in new_ids], False


def sample_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    settings: PeerSettings,
    eos_ids: Sequence[int],
    pad_id: int,
) -> list[list[Response]]:
    """``settings.samples_per_prompt`` sampled responses per prompt, by ``model.generate`` on
    left-padded batches of ``settings.generate_batch_size`` prompts."""
    out: list[list[Response]] = []
    n = settings.samples_per_prompt
    for start in range(0, len(prompt_ids), settings.generate_batch_size):
        rows = prompt_ids[start : start + settings.generate_batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.inference_mode():
            generated = model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                max_new_tokens=settings.max_new_tokens,
                num_return_sequences=n,
                eos_token_id=list(eos_ids),
                pad_token_id=pad_id,
            )
        new = generated[:, width:].tolist()  # row k·n + j: sample j of prompt k
        out += [
            [first_response(new[k * n + j], eos_ids) for j in range(n)] for k in range(len(rows))
        ]
    return out


# ----------------------------------------------------------------------------- 2. judge


def pack_rows(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids, attention_mask, loss_mask [N, T]``: prompt + response right-padded to the
    longest row; ``loss_mask`` is 1 on response tokens."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    loss = torch.zeros((len(prompts), width), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor([*p, *r])
        attention[i, : len(p) + len(r)] = 1
        loss[i, len(p) : len(p) + len(r)] = 1
    return ids, attention, loss


def summed_token_logps(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor):
    """``Σ_t m_t · log softmax(h_{t−1})[y_t]`` per row: ``logits [N,T,V]`` (position ``t``
    predicts token ``t+1``), ``ids, loss_mask [N,T]`` → ``[N]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, 2, ids[:, 1:, None]).squeeze(-1)
    return (picked * loss_mask[:, 1:]).sum(-1)


def response_logps(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    rows_per_batch: int,
) -> np.ndarray:
    """``log π(y_i | x_i)`` ``[N]`` (float64) summed over the response tokens, by forward
    passes over right-padded batches of ``rows_per_batch`` rows."""
    out = np.zeros(len(prompts), np.float64)
    with torch.inference_mode():
        for start in range(0, len(prompts), rows_per_batch):
            end = start + rows_per_batch
            ids, attention, loss = pack_rows(prompts[start:end], responses[start:end], pad_id)
            logits = model(input_ids=ids, attention_mask=attention).logits
            out[start:end] = summed_token_logps(logits, ids, loss).double().numpy()
    return out


def judge_pairs(
    policy,
    init,
    prompt_ids: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Response]],
    settings: PeerSettings,
    pad_id: int,
) -> list[dict]:
    """One pair per prompt from its two responses, labelled by the implicit reward
    ``r = β·(log π_{i-1}(y|x) − log π_init(y|x))`` (÷ token count with ``judge_reward =
    mean``): the higher-reward response is ``chosen``. A prompt whose two responses are
    the same or one is empty gives no pair. Pairs carry ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` (cut to ``max_response_tokens``) and ``margin = r_c − r_r``."""
    limit = settings.max_response_tokens
    prompts = [p for p, cands in zip(prompt_ids, candidates, strict=True) for _ in cands]
    responses = [ids[:limit] for cands in candidates for ids, _ in cands]
    rows = 2 * settings.batch_size  # the judge's batches are training's: B pairs, 2B rows
    logp = response_logps(policy, prompts, responses, pad_id, rows)
    logp_init = response_logps(init, prompts, responses, pad_id, rows)
    rewards = settings.beta * (logp - logp_init)
    if settings.judge_reward == "mean":
        rewards = rewards / np.maximum([len(r) for r in responses], 1)
    pairs, k = [], 0
    for p, cands in zip(prompt_ids, candidates, strict=True):
        ids = responses[k : k + len(cands)]
        r = rewards[k : k + len(cands)]
        k += len(cands)
        hi, lo = int(np.argmax(r)), int(np.argmin(r))
        if hi == lo or ids[hi] == ids[lo] or not ids[hi] or not ids[lo]:
            continue
        pairs.append(
            {
                "prompt_ids": list(p),
                "chosen_ids": ids[hi],
                "rejected_ids": ids[lo],
                "margin": float(r[hi] - r[lo]),
            }
        )
    return pairs


# ----------------------------------------------------------------------------- 3. train


class MarginWindow:
    """The margins of the last ``capacity`` pairs (the oldest dropped first); the threshold
    ``τ`` is their ``q``-quantile (numpy's linear interpolation), ``−inf`` while empty."""

    def __init__(self, capacity: int):
        self.values: collections.deque[float] = collections.deque(maxlen=capacity)

    def threshold(self, q: float) -> float:
        if not self.values:
            return -math.inf
        return float(np.quantile(np.asarray(self.values, np.float64), q))

    def push(self, margins: Iterable[float]) -> None:
        self.values.extend(float(m) for m in margins)


def spa_refinement_loss(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    threshold: float,
    flagging: bool,
    beta: float,
    lam: float,
    alpha: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPA's DPO loss with self-refinement (Kim et al. 2024, Sec. 4.2, eq. 9) on one batch.

    Rows ``0..B-1`` of ``ids, loss_mask [2B,T]`` are the chosen responses, rows ``B..2B-1``
    the rejected ones; ``policy_logits`` (with gradient) and ``ref_logits [2B,T,V]`` are
    ``π_θ``'s and the frozen ``π_ref``'s. With ``S(h, y) = Σ_t log softmax(h_t)[y_t]``:

    - de-coupled noise detection: ``h̃ = (1+λ)·h_θ − λ·h_ref`` and
      ``m̃ = β·[(S(h̃,c) − S(h_ref,c)) − (S(h̃,r) − S(h_ref,r))]`` (no gradient);
    - flags ``z = 1[m̃ < τ]`` when ``flagging`` (``τ = threshold``, the window's quantile);
    - ``Δ = (S(h_θ,c) − S(h_ref,c)) − (S(h_θ,r) − S(h_ref,r))`` and, with ``α_i = α·z_i``,
      ``ℓ_i = −(1−α_i)·log σ(βΔ_i) − α_i·log σ(−βΔ_i)``;
    - ``loss = Σ w_i ℓ_i / max(Σ w_i, 1e-8)`` (``weight [B]``, default 1; 0 = padding).

    Returns ``(loss, m̃ [B], z [B])``.
    """
    b = ids.shape[0] // 2
    if weight is None:
        weight = torch.ones(b)
    logp = summed_token_logps(policy_logits, ids, loss_mask)
    with torch.no_grad():
        ref_logp = summed_token_logps(ref_logits, ids, loss_mask)
        mixed = (1.0 + lam) * policy_logits.detach() - lam * ref_logits
        mixed_logp = summed_token_logps(mixed, ids, loss_mask)
        margin = beta * ((mixed_logp[:b] - ref_logp[:b]) - (mixed_logp[b:] - ref_logp[b:]))
        z = ((margin < threshold) & (weight > 0)).float() * float(flagging)
        smoothing = alpha * z
    delta = (logp[:b] - ref_logp[:b]) - (logp[b:] - ref_logp[b:])
    per_pair = -(1.0 - smoothing) * F.logsigmoid(beta * delta) - smoothing * F.logsigmoid(
        -beta * delta
    )
    loss = (weight * per_pair).sum() / weight.sum().clamp_min(1e-8)
    return loss, margin, z


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """The learning rate of update ``step`` (0-based) over its peak: linear from 0 over the
    first ``int(warmup_ratio·total)`` updates, then cosine (``½(1 + cos(π·s/D))``), linear
    (``1 − s/D``) or constant, ``s`` the updates since warm-up and ``D`` the rest of them
    (HF ``get_cosine_schedule_with_warmup``; jaxalign's ``training.make_schedule``)."""
    total = max(total_steps, 1)
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return step / warmup
    decay = max(total - warmup, 1)
    progress = min(step - warmup, decay) / decay
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def train_refined(policy, pairs: Sequence[dict], settings: PeerSettings, pad_id: int) -> dict:
    """``settings.epochs`` passes over ``pairs`` in batches of ``settings.batch_size`` (a
    seeded shuffle per epoch, each batch padded to its longest row), against a frozen copy
    of ``policy`` as the reference, with :func:`spa_refinement_loss`. Flags start after
    ``int(flag_warmup_ratio · steps)`` steps. Trains ``policy`` in place; returns counts."""
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(
        policy.parameters(),
        lr=settings.learning_rate,
        betas=(settings.adam_b1, settings.adam_b2),
        eps=settings.adam_eps,
        weight_decay=settings.weight_decay,
    )
    batches = math.ceil(len(pairs) / settings.batch_size)
    total = settings.epochs * batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, total, settings.warmup_ratio, settings.schedule),
    )
    flag_after = int(settings.flag_warmup_ratio * total)
    window = MarginWindow(settings.margin_window)
    rng = np.random.default_rng(settings.seed)
    flagged = skipped = 0
    loss = torch.zeros(())  # the last step's, reported
    for step in range(total):
        position = step % batches
        if position == 0:
            order = rng.permutation(len(pairs))
        chunk = [pairs[j] for j in order[position * settings.batch_size :][: settings.batch_size]]
        prompts = [p["prompt_ids"] for p in chunk] * 2
        responses = [p["chosen_ids"] for p in chunk] + [p["rejected_ids"] for p in chunk]
        ids, attention, loss_mask = pack_rows(prompts, responses, pad_id)
        logits = policy(input_ids=ids, attention_mask=attention).logits
        with torch.no_grad():
            ref_logits = reference(input_ids=ids, attention_mask=attention).logits
        loss, margin, z = spa_refinement_loss(
            logits,
            ref_logits,
            ids,
            loss_mask,
            threshold=window.threshold(settings.noise_quantile),
            flagging=step >= flag_after,
            beta=settings.beta,
            lam=settings.lam,
            alpha=settings.smoothing_alpha,
        )
        del logits, ref_logits
        window.push(margin.tolist())
        flagged += int(z.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
        if torch.isfinite(loss) and torch.isfinite(norm):
            optimizer.step()
        else:  # as jaxalign's step does: a non-finite update is dropped, and counted
            skipped += 1
        scheduler.step()
    policy.eval()
    return {
        "steps": total,
        "skipped_steps": skipped,
        "flagged": flagged,
        "flag_after_step": flag_after,
        "final_loss": loss.item(),
    }


# ----------------------------------------------------------------------------- the round


def run_round(
    init_source: tuple[str, str | None],
    policy_folder: str,
    prompt_ids: Sequence[Sequence[int]],
    eos_ids: Sequence[int],
    pad_id: int,
    settings: dict,
    threads: int | None = None,
) -> dict:
    """One SPA round from ``π_{i-1}`` (the Hugging Face folder ``policy_folder``) with judge
    reference ``π_init`` (``(folder, gguf_file or None)``, see :func:`load_causal_lm`) on
    ``prompt_ids`` (encoded prompts); returns seconds per stage and what each made.

    Loading the two models is not timed; each stage is, from its first call to its last
    result (torch has nothing to compile). ``threads``: torch's intra-op threads (default:
    one per core)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    config = PeerSettings(**settings)
    init = load_causal_lm(*init_source).requires_grad_(False)
    policy = load_causal_lm(policy_folder)
    torch.manual_seed(config.seed)

    start = time.perf_counter()
    candidates = sample_responses(policy, prompt_ids, config, eos_ids, pad_id)
    sampled = time.perf_counter()
    pairs = judge_pairs(policy, init, prompt_ids, candidates, config, pad_id)
    judged = time.perf_counter()
    trained = train_refined(policy, pairs, config, pad_id) if pairs else {"steps": 0}
    done = time.perf_counter()
    return {
        "seconds": {
            "sample": sampled - start,
            "judge": judged - sampled,
            "train": done - judged,
            "total": done - start,
        },
        "prompts": len(prompt_ids),
        "responses": sum(len(c) for c in candidates),
        "sample_tokens": sum(len(ids) for c in candidates for ids, _ in c),
        "pairs": len(pairs),
        **{f"train_{k}": v for k, v in trained.items()},
        "torch_threads": torch.get_num_threads(),
    }
