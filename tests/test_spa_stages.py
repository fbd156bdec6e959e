"""SPA's stages against independent references: the prompts a response is sampled, judged
and trained under are the same tokens; the judge's rewards equal a plain forward pass
computed by hand; the pair is the best against the worst; self-refinement's per-pair log."""

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sampling
from jaxalign.algorithms import spa, stages
from jaxalign.algorithms.rounds import atomic_write_jsonl, read_jsonl
from jaxalign.config import load_config
from jaxalign.data.pairs import pair_batches
from jaxalign.generation import pad_left, prompt_key

PROMPTS = [
    "Name three colours of the rainbow, please.",
    "What is the capital of France? Answer briefly and clearly, in a single short line.",
    "Say hello.",
    "Describe a cat in one short sentence for a child who has never seen one.",
]


def _context(tiny_model_dir, out: pathlib.Path, *overrides):
    config = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "data.use_chat_template=false",  # plain-text prompts ...
            "data.max_prompt_tokens=24",  # ... cut to their last 24 tokens
            "data.max_response_tokens=12",
            "sampling.max_new_tokens=12",
            "sampling.temperature=1.0",
            "train.batch_size=4",
            "train.learning_rate=1e-3",
            "train.logp_chunk_size=16",
            "train.beta=0.5",
            "spa.samples_per_prompt=4",
            "spa.margin_window=8",
            "eval.enabled=false",
            "run.generate_batch_size=4",
            "run.progress=false",
            "run.mesh.data=2",  # 8 fake devices: sampling, scoring and training run sharded
            "run.mesh.fsdp=2",
            "run.mesh.tensor=2",
            f"run.output_dir={out}",
            *overrides,
        ],
    )
    return stages.start_run(config, log=lambda m: None)


def _with(ctx, **spa_changes):
    """The same context with other ``spa.*`` settings (the model stays loaded)."""
    config = ctx.config
    return dataclasses.replace(
        ctx, config=dataclasses.replace(config, spa=dataclasses.replace(config.spa, **spa_changes))
    )


def _prompt_records():
    return [{"id": f"p{i}", "prompt": p, "note": i} for i, p in enumerate(PROMPTS)]


def _perturbed(params, scale=0.05, seed=0):
    """A policy that differs from π_init, so implicit rewards are not all zero; host arrays,
    as a stage loaded from disk hands them on (the plain re-implementations below compute
    with them eagerly on one device)."""
    leaves, tree = jax.tree.flatten(jax.device_get(params))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A run context and runner, with four samples per prompt from π_init."""
    ctx, runner = _context(tiny_model_dir, tmp_path_factory.mktemp("spa_stages") / "run")
    candidates = spa.sample_candidates(ctx, 1, ctx.init_params, _prompt_records())
    return ctx, runner, candidates


def test_sampled_judged_and_trained_prompts_are_the_same_tokens(run):
    ctx, _, candidates = run
    tok = ctx.tokenizer
    for record in candidates:
        expected = tok.encode_prompt(record["prompt"], use_chat_template=False)[-24:]
        assert record["prompt_ids"] == expected and record["note"] is not None
        assert len(record["responses"]) == 4
    # The sampler decoded from those ids: the same prompt and key through generate()
    # directly reproduces the sampled tokens.
    record = candidates[1]
    ids, mask = pad_left([record["prompt_ids"]], 32, tok.pad_token_id)
    key = prompt_key(jax.random.key(ctx.config.run.seed * 1000 + 1), "p1")
    config = stages.sampling_config(ctx, n=4)
    out = sampling.generate(ctx.model(ctx.init_params), ids, mask, key[None], config)
    for j, response in enumerate(record["responses"]):
        assert np.asarray(out.tokens)[j, : out.lengths[j]].tolist() == response["token_ids"]

    pairs, _ = spa.judge_candidates(ctx, _perturbed(ctx.init_params), candidates)
    assert pairs, "some prompts must form pairs"
    batches, report = pair_batches(pairs, tok, ctx.config)
    assert report.kept == len(pairs)
    ends = set(tok.eos_token_ids)
    by_id = {c["id"]: c for c in candidates}
    for batch in batches:
        for row, index in enumerate(batch["index"]):
            if index < 0:
                continue
            pair = pairs[index]
            for side in ("chosen", "rejected"):
                attn = batch[f"{side}_attention_mask"][row].astype(bool)
                loss = batch[f"{side}_loss_mask"][row].astype(bool)
                tokens = batch[f"{side}_ids"][row]
                assert tokens[attn & ~loss].tolist() == pair["prompt_ids"]
                sampled = by_id[pair["id"]]["responses"][pair[f"{side}_index"]]
                want = sampled["token_ids"]
                if sampled["finished"] and not (want and want[-1] in ends):
                    want = [*want, tok.end_of_turn_id]
                assert tokens[loss].tolist() == want[:12]


_WIDTH = 48  # every hand-scored sequence is right-padded to this many tokens (one compile)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, ids):
    mask = (jnp.arange(_WIDTH) < jnp.sum(ids >= 0))[None].astype(jnp.int32)
    tokens = jnp.maximum(ids, 0)[None]
    return nnx.merge(graphdef, params)(tokens, jnp.arange(_WIDTH)[None], mask)[0][0]


def _hand_logp(ctx, params, prompt_ids, response_ids) -> float:
    """``Σ_t log softmax(logits)[y_t]`` over the response: every position's full logits from
    the model's plain forward pass, the log-softmax in float64 numpy."""
    sequence = prompt_ids + response_ids
    ids = np.full(_WIDTH, -1, np.int32)
    ids[: len(sequence)] = sequence
    logits = np.asarray(_full_logits(ctx.graphdef, params, ids), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    n = len(prompt_ids)
    return float(sum(logp[n - 1 + t, y] for t, y in enumerate(response_ids)))


@pytest.mark.parametrize("reward", ["sum", "mean"])
def test_candidate_rewards_are_the_implicit_reward_of_a_forward_pass(run, reward):
    base, _, four = run
    ctx = _with(base, judge_reward=reward)
    judge = _perturbed(ctx.init_params)
    # Three candidates per prompt: an odd count shares a scoring row with candidate 0. The
    # tiny model's samples all run to the limit, so two are made finished by hand: one
    # without its end token (the scored tokens gain the end of turn) and one ending with it.
    eos = min(ctx.tokenizer.eos_token_ids)

    def finished(x, ids):
        return {**x, "token_ids": ids, "num_tokens": len(ids), "finished": True}

    candidates = [
        {
            **c,
            "responses": [
                c["responses"][0],
                finished(c["responses"][1], c["responses"][1]["token_ids"][:5]),
                finished(c["responses"][2], [*c["responses"][2]["token_ids"][:4], eos]),
            ],
        }
        for c in four[:3]
    ]
    rewards = spa.candidate_rewards(ctx, judge, candidates)
    ends = set(ctx.tokenizer.eos_token_ids)
    beta = ctx.config.train.beta
    for record, row in zip(candidates, rewards, strict=True):
        assert len(row) == 3
        for response, got in zip(record["responses"], row, strict=True):
            ids = response["token_ids"]
            if response["finished"] and not (ids and ids[-1] in ends):
                ids = [*ids, ctx.tokenizer.end_of_turn_id]
            log_ratio = _hand_logp(ctx, judge, record["prompt_ids"], ids) - _hand_logp(
                ctx, ctx.init_params, record["prompt_ids"], ids
            )
            want = beta * log_ratio / (len(ids) if reward == "mean" else 1)
            assert math.isclose(got, want, rel_tol=2e-3, abs_tol=2e-5), (got, want)


def test_the_pair_is_the_best_against_the_worst_and_keep_fraction_keeps_the_surest(run):
    ctx, _, candidates = run
    judge = _perturbed(ctx.init_params, seed=1)
    rewards = spa.candidate_rewards(ctx, judge, candidates)
    pairs, counts = spa.judge_candidates(ctx, judge, candidates)
    assert counts.considered == len(candidates) == counts.kept + counts.skipped
    by_id = {c["id"]: (c, r) for c, r in zip(candidates, rewards, strict=True)}
    for pair in pairs:
        record, row = by_id[pair["id"]]
        distinct = {}
        for j, response in enumerate(record["responses"]):
            distinct.setdefault(response["text"].strip(), j)
        usable = [j for t, j in distinct.items() if t]
        assert pair["chosen_index"] == max(usable, key=lambda j: (row[j], -j))
        assert pair["rejected_index"] == min(usable, key=lambda j: (row[j], j))
        assert math.isclose(pair["margin"], row[pair["chosen_index"]] - row[pair["rejected_index"]])
        assert pair["note"] == record["note"]  # the prompt record's own fields travel
    half, half_counts = spa.judge_candidates(_with(ctx, keep_fraction=0.5), judge, candidates)
    margins = sorted((p["margin"] for p in pairs), reverse=True)
    assert len(half) == math.ceil(len(pairs) / 2) == half_counts.kept
    assert sorted((p["margin"] for p in half), reverse=True) == margins[: len(half)]
    assert half_counts.below_keep_fraction == len(pairs) - len(half)


@pytest.mark.parametrize("truncated_policy", ["keep", "reject"])
def test_length_control_pairs_by_the_reward_less_its_length_trend(run, truncated_policy, tmp_path):
    """``spa.length_control=regress``: the slope is least squares of the implicit reward on
    the response's token count with one intercept per prompt (numpy lstsq, over the
    responses the pair choice ranks), and the pair is the best against the worst by
    ``r − b·n``; the records carry ``b`` and the adjusted rewards."""
    base, _, sampled = run
    ctx = _with(base, length_control="regress", truncated_policy=truncated_policy)
    # Responses of 3, 6, 9 and 12 tokens, every other one finished, so lengths differ
    # within each prompt (the tiny model's own samples all run to the limit).
    candidates = [
        {
            **c,
            "responses": [
                {
                    **x,
                    "text": f"{x['text']} #{j}",
                    "token_ids": x["token_ids"][: 3 + 3 * j],
                    "num_tokens": len(x["token_ids"][: 3 + 3 * j]),
                    "finished": j % 2 == 0,
                    "truncated": j % 2 == 1,
                }
                for j, x in enumerate(c["responses"])
            ],
        }
        for c in sampled
    ]
    judge = _perturbed(ctx.init_params, seed=4)
    raw = spa.candidate_rewards(ctx, judge, candidates)
    rows, dummies = [], []
    for k, (record, rewards) in enumerate(zip(candidates, raw, strict=True)):
        for response, r in zip(record["responses"], rewards, strict=True):
            if response["finished"] or truncated_policy == "keep":
                rows.append((response["num_tokens"], r))
                dummies.append(k)
    design = np.zeros((len(rows), 1 + len(candidates)))
    design[:, 0] = [n for n, _ in rows]
    design[np.arange(len(rows)), 1 + np.asarray(dummies)] = 1.0
    design = design[:, design.any(0)]
    slope = np.linalg.lstsq(design, np.asarray([r for _, r in rows]), rcond=None)[0][0]
    pairs, counts = spa.judge_candidates(ctx, judge, candidates)
    assert pairs and counts.kept == len(pairs)
    by_id = {c["id"]: (c, r) for c, r in zip(candidates, raw, strict=True)}
    for pair in pairs:
        assert math.isclose(pair["length_slope"], slope, rel_tol=1e-6, abs_tol=1e-9)
        record, rewards = by_id[pair["id"]]
        adjusted = [
            r - slope * x["num_tokens"] for r, x in zip(rewards, record["responses"], strict=True)
        ]
        for side in ("chosen", "rejected"):
            want = adjusted[pair[f"{side}_index"]]
            assert math.isclose(pair[f"reward_{side}"], want, rel_tol=1e-6, abs_tol=1e-9)
        if pair["rule"] is None:
            finished = [
                j
                for j, x in enumerate(record["responses"])
                if x["text"].strip() and (x["finished"] or truncated_policy == "keep")
            ]
            distinct = {}
            for j in finished:
                distinct.setdefault(record["responses"][j]["text"].strip(), j)
            usable = list(distinct.values())
            assert pair["chosen_index"] == max(usable, key=lambda j: (adjusted[j], -j))
            assert pair["rejected_index"] == min(usable, key=lambda j: (adjusted[j], j))
    # the stage writes the pairs and records the slope and the means of what it wrote
    path = tmp_path / "candidates.jsonl"
    atomic_write_jsonl(path, candidates)
    result = spa.judge_stage(ctx, judge, str(path), tmp_path)
    assert math.isclose(result["length_slope"], slope, rel_tol=1e-6, abs_tol=1e-9)
    assert result["count/kept"] == len(pairs) and result["pairs"] == str(tmp_path / "pairs.jsonl")
    assert result["margin_mean"] == pytest.approx(np.mean([p["margin"] for p in pairs]))
    assert len(read_jsonl(tmp_path / "pairs.jsonl")) == len(pairs)


def test_a_round_trains_against_its_starting_policy_and_logs_its_flags(run, tmp_path):
    """Round i ≥ 1 trains π_i from π_{i-1} with reference π_{i-1}: at the first step the
    policy is its reference, so every margin is 0 and the loss is log 2. Every pair's
    extrapolated margin and flag land in refinement.jsonl, and each step's share of flagged
    pairs is the step's logged flagged fraction."""
    base, _, candidates = run
    ctx = _with(base, flag_warmup_ratio=0.0)
    start = _perturbed(ctx.init_params, seed=2)
    pairs, _ = spa.judge_candidates(ctx, start, candidates * 3)
    pairs = [{**p, "id": f"{p['id']}-{k}"} for k, p in enumerate(pairs)]
    result, _ = spa.train_stage(ctx, 1, start, pairs, tmp_path)
    steps = _logged_steps(ctx, "round_1/train")
    first = min(steps, key=lambda m: m["step"])
    assert abs(first["rewards/margin"]) < 1e-5
    assert math.isclose(first["train/loss"], math.log(2), rel_tol=1e-5)
    rows = read_jsonl(tmp_path / "refinement.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in pairs)  # one epoch
    assert len(steps) == result["steps"]
    for m in steps:
        mine = [r for r in rows if r["step"] == m["step"]]
        assert mine and all(r["flagged"] in (0.0, 1.0) for r in mine)
        assert math.isclose(
            sum(r["flagged"] for r in mine) / len(mine), m["spa/flagged_fraction"], abs_tol=1e-6
        )


def test_the_judge_is_the_previous_policy_unless_told_to_keep_the_seed_model(run, tmp_path):
    from jaxalign import checkpoint

    base, runner, _ = run
    seed_model = _perturbed(base.init_params, seed=3)
    checkpoint.save_params(tmp_path / "seed_model", seed_model)
    runner.stage(0, "train", lambda d: {"model": str(tmp_path / "seed_model")})
    previous = _perturbed(base.init_params, seed=4)
    seed_ctx = _with(base, judge_policy="seed")

    def same(a, b):
        return all(
            np.array_equal(np.asarray(x), np.asarray(y))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    assert same(spa.round_policies(base, runner, 2, previous)[1], previous)  # the paper: π_{i-1}
    assert same(spa.round_policies(seed_ctx, runner, 1, previous)[1], previous)  # π_0 is π_{i-1}
    assert same(spa.round_policies(seed_ctx, runner, 2, previous)[1], seed_model)
    # spa.sample_policy=seed samples rounds ≥ 2 from π_0 too; with both on π_0 the sampler
    # and the judge are one object (so the judge reads the sampler's log-probs).
    sampler, judge = spa.round_policies(seed_ctx, runner, 2, previous)
    assert sampler is previous and same(judge, seed_model)
    both = _with(base, judge_policy="seed", sample_policy="seed")
    sampler, judge = spa.round_policies(both, runner, 2, previous)
    assert sampler is judge and same(sampler, seed_model)
    sampler, judge = spa.round_policies(_with(base, sample_policy="seed"), runner, 3, previous)
    assert same(sampler, seed_model) and judge is previous
    sampler, judge = spa.round_policies(both, runner, 1, previous)  # π_0 is π_{i-1}
    assert sampler is judge is previous


def test_the_samplers_log_probs_are_the_forward_passes(run):
    """The judge may take π_{i-1}'s log-probs from the sampler (spa.judge_from_sampler): the
    unmodified distribution's log-probs of the sampled tokens, summed, equal a forward pass
    over the same tokens within 1e-4."""
    from jaxalign import scoring

    ctx, _, candidates = run
    records, slots = spa._scoring_records(candidates)
    from_sampler = spa._sampler_logps(ctx, candidates, slots)
    assert from_sampler is not None
    forward = scoring.response_logps(
        ctx.graphdef, ctx.init_params, records, ctx.tokenizer, ctx.config, ctx.mesh
    )
    np.testing.assert_allclose(from_sampler, forward, rtol=0, atol=1e-4)
    assert np.all(forward < 0)
    # With the judge's model as the sampler, rewards from either source agree.
    both = spa.candidate_rewards(ctx, ctx.init_params, candidates, sampled_by_judge=True)
    plain = spa.candidate_rewards(
        _with(ctx, judge_from_sampler=False), ctx.init_params, candidates, True
    )
    np.testing.assert_allclose(
        np.asarray(both), np.asarray(plain), atol=1e-4 * ctx.config.train.beta
    )
    assert np.abs(np.asarray(plain)).max() < 1e-4  # π_init judged against itself


def test_each_round_extrapolates_with_its_own_lambda(run, tmp_path, monkeypatch):
    """Round i's self-refinement uses λ_i of the paper's schedule (1/2, 1/4, 1/8; the last
    repeats): the λ handed to the loss of rounds 1-4 is read off the loss builder."""
    from jaxalign import loop, refinement

    ctx, _, candidates = run
    pairs, _ = spa.judge_candidates(ctx, _perturbed(ctx.init_params, seed=5), candidates)
    seen = []
    build = refinement.spa_loss_fn

    class Built(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(kwargs["lam"])
        return build(*args, **kwargs)

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(refinement, "spa_loss_fn", spy)
    monkeypatch.setattr(loop, "train", stop)
    for i in (1, 2, 3, 4):
        with pytest.raises(Built):
            spa.train_stage(ctx, i, ctx.init_params, pairs, tmp_path / f"round_{i}")
    assert seen == [0.5, 0.25, 0.125, 0.125]


# ------------------------------------------------- one self-refining round, re-implemented


def _logged_steps(ctx, tag):
    """The metrics lines a training logged under ``tag``, one per step."""
    lines = ctx.metrics.path.read_text().splitlines()
    return [m for m in (json.loads(line) for line in lines) if m.get("tag") == tag]


def _first_step(ctx, tag):
    return min(_logged_steps(ctx, tag), key=lambda m: m["step"])


def _train_changes(ctx, **train_changes):
    config = ctx.config
    return dataclasses.replace(
        ctx,
        config=dataclasses.replace(
            config, train=dataclasses.replace(config.train, **train_changes)
        ),
    )


def _pair_tokens(ctx, pair, side):
    """Prompt ids and response ids of one side of a pair, as the round trains them: the
    sampled ids, an end-of-turn token after a finished response that lacks one, cut to
    ``data.max_response_tokens``."""
    ids = list(pair[f"{side}_ids"])
    ends = set(ctx.tokenizer.eos_token_ids)
    if pair[f"{side}_eos"] and not (ids and ids[-1] in ends):
        ids.append(ctx.tokenizer.end_of_turn_id)
    return list(pair["prompt_ids"]), ids[: ctx.config.data.max_response_tokens]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _plain_sequence_logps(graphdef, policy, reference, ids, response_mask, lam):
    """Per row: ``Σ log π(y_t)``, ``Σ log π_ref(y_t)`` and ``Σ log p̃(y_t)`` over the response,
    from every position's full logits (right-padded rows, positions 0..T-1), with
    ``p̃ = softmax((1 + λ)·h_π − λ·h_ref)``: no chunking, no custom gradient."""
    width = ids.shape[1]
    attention = (ids >= 0).astype(jnp.int32)
    tokens = jnp.maximum(ids, 0)
    positions = jnp.broadcast_to(jnp.arange(width), ids.shape)

    def logits_of(params):
        return nnx.merge(graphdef, params)(tokens, positions, attention)[0].astype(jnp.float32)

    h_policy = logits_of(policy)
    h_ref = jax.lax.stop_gradient(logits_of(reference))
    targets = tokens[:, 1:]
    mask = response_mask[:, 1:].astype(jnp.float32)

    def picked(logits):
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask, -1)

    mixed = jax.lax.stop_gradient((1.0 + lam) * h_policy - lam * h_ref)
    return picked(h_policy), picked(h_ref), picked(mixed)


def _plain_rows(ctx, pairs):
    """``[2B, 48]`` ids (chosen rows, then rejected; -1 = padding) and response masks."""
    rows, masks = [], []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            prompt, response = _pair_tokens(ctx, pair, side)
            ids = np.full(_WIDTH, -1, np.int32)
            ids[: len(prompt) + len(response)] = prompt + response
            mask = np.zeros(_WIDTH, np.int32)
            mask[len(prompt) : len(prompt) + len(response)] = 1
            rows.append(ids)
            masks.append(mask)
    return jnp.asarray(np.stack(rows)), jnp.asarray(np.stack(masks))


def test_a_self_refining_round_matches_a_plain_reimplementation(run, tmp_path):
    """Round 1 of SPA, step by step, against a re-implementation written from the paper's
    equations: every step's extrapolated margins ``m̃ = β[(log p̃ − log π_ref)(c) −
    (log p̃ − log π_ref)(r)]`` with ``p̃ = softmax(1.5·h_θ − 0.5·h_ref)``, the threshold (the
    10% quantile of the last ``margin_window`` margins of earlier steps, numpy's), the flags
    ``m̃ < τ``, the smoothed DPO loss, and the next step's parameters by clipped Adam from a
    gradient of the plain loss. Compared with the round's refinement.jsonl and metrics."""
    base, _, candidates = run
    ctx = _train_changes(
        _with(base, flag_warmup_ratio=0.0, margin_window=6), warmup_ratio=0.0, schedule="constant"
    )
    cfg = ctx.config
    start = _perturbed(ctx.init_params, seed=4)
    judged, _ = spa.judge_candidates(ctx, _perturbed(ctx.init_params, seed=3), candidates)
    pairs = [{**p, "id": f"{p['id']}-{k}"} for k, p in enumerate(judged * 4)]
    assert len(pairs) >= 3 * cfg.train.batch_size, "the test needs at least three steps"
    result, _ = spa.train_stage(ctx, 1, start, pairs, tmp_path)

    logged = {m["step"]: m for m in _logged_steps(ctx, "round_1/train")}
    rows = read_jsonl(tmp_path / "refinement.jsonl")
    by_id = {p["id"]: p for p in pairs}
    beta, lam, alpha = cfg.train.beta, 0.5, cfg.spa.smoothing_alpha
    lr, b1, b2, eps = (
        cfg.train.learning_rate,
        cfg.train.adam_b1,
        cfg.train.adam_b2,
        cfg.train.adam_eps,
    )

    params = start
    m_state = jax.tree.map(jnp.zeros_like, start)
    v_state = jax.tree.map(jnp.zeros_like, start)
    window: list[float] = []
    checked_flags = 0
    for step in range(1, result["steps"] + 1):
        mine = [r for r in rows if r["step"] == step]
        batch = [by_id[r["id"]] for r in mine]
        b = len(batch)
        ids, response_mask = _plain_rows(ctx, batch)
        logp, ref_logp, mixed_logp = (
            np.asarray(x, np.float64)
            for x in _plain_sequence_logps(ctx.graphdef, params, start, ids, response_mask, lam)
        )
        margins = beta * ((mixed_logp[:b] - ref_logp[:b]) - (mixed_logp[b:] - ref_logp[b:]))
        threshold = np.quantile(window, cfg.spa.noise_quantile) if window else -np.inf
        flags = (margins < threshold).astype(np.float64)
        for r, want, flag in zip(mine, margins, flags, strict=True):
            # Float32 noise compounds over the steps (Adam divides it by small second moments).
            assert math.isclose(r["extrapolated_margin"], want, rel_tol=1e-3, abs_tol=5e-5)
            if abs(want - threshold) > 1e-4:  # a margin at the threshold could go either way
                assert r["flagged"] == flag, (step, r, threshold)
                checked_flags += 1
        smoothing = alpha * flags
        delta = (logp[:b] - ref_logp[:b]) - (logp[b:] - ref_logp[b:])
        log_sig = -np.logaddexp(0.0, -beta * delta)
        log_sig_neg = -np.logaddexp(0.0, beta * delta)
        loss = np.mean(-(1 - smoothing) * log_sig - smoothing * log_sig_neg)
        m = logged[step]
        assert math.isclose(m["train/loss"], loss, rel_tol=1e-4, abs_tol=1e-6), (step, m, loss)
        assert math.isclose(m["spa/flagged_fraction"], flags.mean(), abs_tol=1e-6)
        want_threshold = threshold if np.isfinite(threshold) else 0.0
        assert math.isclose(m["spa/threshold"], want_threshold, rel_tol=1e-3, abs_tol=5e-5)
        window = (window + list(margins))[-cfg.spa.margin_window :]

        smoothing_j = jnp.asarray(smoothing, jnp.float32)

        def plain_loss(p, ids=ids, response_mask=response_mask, b=b, smoothing_j=smoothing_j):
            lp, rp, _ = _plain_sequence_logps(ctx.graphdef, p, start, ids, response_mask, lam)
            d = beta * ((lp[:b] - rp[:b]) - (lp[b:] - rp[b:]))
            per_pair = -(1 - smoothing_j) * jax.nn.log_sigmoid(d) - smoothing_j * (
                jax.nn.log_sigmoid(-d)
            )
            return jnp.mean(per_pair)

        grads = jax.grad(plain_loss)(params)
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
        scale = jnp.minimum(1.0, cfg.train.max_grad_norm / norm)
        grads = jax.tree.map(lambda g, scale=scale: g * scale, grads)
        m_state = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m_state, grads)
        v_state = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v_state, grads)
        params = jax.tree.map(
            lambda p, m, v, step=step: (
                p - lr * (m / (1 - b1**step)) / (jnp.sqrt(v / (1 - b2**step)) + eps)
            ),
            params,
            m_state,
            v_state,
        )
    assert result["steps"] >= 3 and checked_flags > 0
    assert any(r["flagged"] for r in rows), "some pair must be flagged for the test to mean much"


def test_a_bfloat16_round_starts_at_margin_zero_and_loss_log_2(run, tmp_path):
    """With ``train.compute_dtype=bfloat16`` the on-the-fly reference computes in the same
    dtype as the policy, so at a round's first step (policy = reference = π_{i-1}) every
    margin is 0 and the loss is log 2, as in float32."""
    base, _, candidates = run
    ctx = _train_changes(_with(base, flag_warmup_ratio=0.0), compute_dtype="bfloat16")
    start = _perturbed(ctx.init_params, seed=6)
    pairs, _ = spa.judge_candidates(ctx, start, candidates * 2)
    pairs = [{**p, "id": f"{p['id']}-{k}"} for k, p in enumerate(pairs)]
    spa.train_stage(ctx, 1, start, pairs, tmp_path)
    first = _first_step(ctx, "round_1/train")
    assert first["rewards/margin"] == 0.0
    assert math.isclose(first["train/loss"], math.log(2), rel_tol=1e-6)
    assert first["spa/extrapolated_margin"] == 0.0


@pytest.mark.parametrize("sample_policy", ["previous", "seed"])
def test_a_round_samples_from_the_model_sample_policy_names(
    tiny_model_dir, tmp_path, monkeypatch, sample_policy
):
    """Round 2 of ``spa_round`` writes the candidates that π_1 (paper) or, with
    ``spa.sample_policy=seed``, π_0 samples from its prompts: token for token the
    candidates :func:`spa.sample_candidates` draws from that model directly."""
    from jaxalign import checkpoint

    ctx, runner = _context(tiny_model_dir, tmp_path / "run", f"spa.sample_policy={sample_policy}")
    seed_model = _perturbed(ctx.init_params, seed=6)
    checkpoint.save_params(tmp_path / "seed_model", seed_model)
    runner.stage(0, "train", lambda d: {"model": str(tmp_path / "seed_model")})
    previous = _perturbed(ctx.init_params, seed=7)

    class Judged(Exception):
        pass

    def stop(*args, **kwargs):
        raise Judged

    monkeypatch.setattr(spa, "train_stage", stop)
    prompts = _prompt_records()[:2]
    with pytest.raises(Judged):
        spa.spa_round(ctx, runner, 2, previous, prompts)
    written = read_jsonl(runner.result(2, "sample")["candidates"])
    sampler = seed_model if sample_policy == "seed" else previous
    other = previous if sample_policy == "seed" else seed_model

    def tokens(records):
        return [[x["token_ids"] for x in r["responses"]] for r in records]

    assert tokens(written) == tokens(spa.sample_candidates(ctx, 2, sampler, prompts))
    assert tokens(written) != tokens(spa.sample_candidates(ctx, 2, other, prompts))


def test_a_round_anchored_at_the_seed_model_trains_against_it(run, tmp_path):
    """``reference=π_0`` (``spa.reference_policy=seed``): round 2 starts at π_1 but its DPO
    reference is π_0, so the first step's margins are ``β[(log π_1 − log π_0)(c) −
    (log π_1 − log π_0)(r)]`` by hand, not 0, its extrapolated margins mix π_1 with π_0
    (λ = 1/4), and its loss is the mean ``−log σ(margin)`` (nothing is flagged at step 1)."""
    base, _, candidates = run
    ctx = _with(base, flag_warmup_ratio=0.0)
    start, anchor = _perturbed(ctx.init_params, seed=2), _perturbed(ctx.init_params, seed=5)
    judged, _ = spa.judge_candidates(ctx, anchor, candidates * 3)
    pairs = [{**p, "id": f"{p['id']}-{k}"} for k, p in enumerate(judged)]
    spa.train_stage(ctx, 2, start, pairs, tmp_path, reference=anchor)
    first = _first_step(ctx, "round_2/train")
    rows = [r for r in read_jsonl(tmp_path / "refinement.jsonl") if r["step"] == 1]
    by_id = {p["id"]: p for p in pairs}
    batch = [by_id[r["id"]] for r in rows]
    ids, response_mask = _plain_rows(ctx, batch)
    logp, ref_logp, mixed = (
        np.asarray(x, np.float64)
        for x in _plain_sequence_logps(ctx.graphdef, start, anchor, ids, response_mask, 0.25)
    )
    b, beta = len(batch), ctx.config.train.beta
    margins = beta * ((logp[:b] - ref_logp[:b]) - (logp[b:] - ref_logp[b:]))
    extrapolated = beta * ((mixed[:b] - ref_logp[:b]) - (mixed[b:] - ref_logp[b:]))
    assert np.abs(margins).max() > 1e-2  # π_1 ≠ π_0: the anchor shows
    for r, want in zip(rows, extrapolated, strict=True):
        assert math.isclose(r["extrapolated_margin"], want, rel_tol=1e-3, abs_tol=1e-5)
    assert math.isclose(first["rewards/margin"], margins.mean(), rel_tol=1e-3, abs_tol=1e-5)
    loss = np.mean(np.logaddexp(0.0, -margins))
    assert math.isclose(first["train/loss"], loss, rel_tol=1e-4, abs_tol=1e-6)


def test_a_dpo_round_anchored_at_the_seed_model_precomputes_its_log_probs(
    run, tmp_path, monkeypatch
):
    """With ``spa.refine`` off a round is DPO with precomputed reference log-probs: they
    come from the reference it is given (π_0), not from the policy it starts at."""
    from jaxalign import scoring

    base, _, candidates = run
    ctx = _with(base, refine=False)
    start, anchor = _perturbed(ctx.init_params, seed=2), _perturbed(ctx.init_params, seed=5)
    pairs, _ = spa.judge_candidates(ctx, anchor, candidates)
    scored_with = []
    original = scoring.with_reference_logps

    def spy(graphdef, params, *args, **kwargs):
        scored_with.append(params)
        return original(graphdef, params, *args, **kwargs)

    monkeypatch.setattr(scoring, "with_reference_logps", spy)
    spa.train_stage(ctx, 2, start, pairs, tmp_path, reference=anchor)
    assert len(scored_with) == 1 and scored_with[0] is anchor
    first = _first_step(ctx, "round_2/train")
    assert abs(first["rewards/margin"]) > 1e-4  # against π_0, π_1's first margins are not 0


@pytest.mark.parametrize(
    ("sample_policy", "judge_policy", "reference_policy"),
    [
        ("seed", "seed", "previous"),  # the paper's reference whoever samples and judges
        ("previous", "previous", "seed"),  # π_0 loaded for the reference alone
        ("seed", "previous", "seed"),  # π_0 the sampler already loaded
        ("previous", "seed", "seed"),  # π_0 the judge already loaded
    ],
)
def test_a_rounds_reference_is_the_model_reference_policy_names(
    tiny_model_dir, tmp_path, monkeypatch, sample_policy, judge_policy, reference_policy
):
    """``spa_round`` hands the train stage π_{i-1} as the reference (paper) or, with
    ``spa.reference_policy=seed`` from round 2 on, π_0, whichever models sample and judge;
    in round 1 π_0 is π_{i-1} either way."""
    from jaxalign import checkpoint

    ctx, runner = _context(
        tiny_model_dir,
        tmp_path / "run",
        f"spa.sample_policy={sample_policy}",
        f"spa.judge_policy={judge_policy}",
        f"spa.reference_policy={reference_policy}",
    )
    seed_model = _perturbed(ctx.init_params, seed=6)
    checkpoint.save_params(tmp_path / "seed_model", seed_model)
    runner.stage(0, "train", lambda d: {"model": str(tmp_path / "seed_model")})
    previous = _perturbed(ctx.init_params, seed=7)
    handed = {}

    class Trained(Exception):
        pass

    def capture(ctx, i, policy, pairs, out, adapters=None, **kwargs):
        handed.update(policy=policy, **kwargs)
        raise Trained

    monkeypatch.setattr(spa, "train_stage", capture)
    for i in (1, 2):
        handed.clear()
        with pytest.raises(Trained):
            spa.spa_round(ctx, runner, i, previous, _prompt_records()[:2])
        assert handed["policy"] is previous
        if i == 1 or reference_policy == "previous":
            assert handed["reference"] is previous
        else:
            pairs = zip(
                jax.tree.leaves(handed["reference"]), jax.tree.leaves(seed_model), strict=True
            )
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)
        assert handed["reference_adapters"] is None  # full fine-tuning: no adapters


def test_seed_holdout_splits_by_id_whatever_the_order_of_the_file():
    pairs = [{"id": f"s{k}", "prompt": "p", "chosen": "a", "rejected": "b"} for k in range(10)]
    train, held = spa.split_seed_pairs(pairs, 0.25)
    assert len(held) == 3 and len(train) == 7  # ceil(2.5)
    assert train + held != pairs and sorted(train + held, key=pairs.index) == pairs
    assert [p for p in pairs if p in held] == held  # file order kept on each side
    # The same pairs are held out of a file that lists them in another order.
    _, again = spa.split_seed_pairs(pairs[::-1], 0.25)
    assert again == held[::-1]
    assert spa.split_seed_pairs(pairs, 0.0) == (pairs, [])
    assert len(spa.split_seed_pairs(pairs, 0.01)[1]) == 1  # any share holds out one at least
    with pytest.raises(ValueError, match="spa.seed_holdout=0.5 holds out all 1 seed pairs"):
        spa.split_seed_pairs(pairs[:1], 0.5)


@pytest.mark.parametrize("reward", ["sum", "mean"])
def test_the_judge_check_orders_held_out_pairs_as_a_forward_pass_does(run, reward):
    """π_0's implicit reward of each held-out pair from forward passes computed by hand, and
    every count of the check (judge, both length rules, the judge against the better rule)
    recomputed from those rewards and the token counts."""
    base, _, candidates = run
    ctx = _with(base, judge_reward=reward)
    judge = _perturbed(ctx.init_params, seed=3)
    pairs = []
    for c in candidates:
        # Labelled pairs of response prefixes, of lengths that differ either way or tie.
        for a, b, na, nb in ((0, 1, 5, 9), (2, 3, 12, 7), (3, 0, 8, 8), (1, 2, 3, 11)):
            sides = {}
            for side, j, n in (("chosen", a, na), ("rejected", b, nb)):
                ids = c["responses"][j]["token_ids"][:n]
                sides.update(
                    {side: ctx.tokenizer.decode(ids), f"{side}_ids": ids, f"{side}_eos": False}
                )
            pairs.append(
                {"id": f"{c['id']}-{a}{b}", "prompt": c["prompt"], "prompt_ids": c["prompt_ids"]}
                | sides
            )
    rows, result = spa.judge_check(ctx, judge, pairs)
    kept = [p for p in pairs if p["chosen"] != p["rejected"]]
    assert [r["id"] for r in rows] == [p["id"] for p in kept] and result["pairs"] == len(kept)
    ends = set(ctx.tokenizer.eos_token_ids)
    beta = ctx.config.train.beta
    want_rewards, lengths = [], []
    for p in kept:
        pair_rewards, pair_lengths = [], []
        for side in ("chosen", "rejected"):
            ids = p[f"{side}_ids"]
            if p[f"{side}_eos"] and not (ids and ids[-1] in ends):
                ids = [*ids, ctx.tokenizer.end_of_turn_id]
            ids = ids[:12]  # data.max_response_tokens
            ratio = _hand_logp(ctx, judge, p["prompt_ids"], ids) - _hand_logp(
                ctx, ctx.init_params, p["prompt_ids"], ids
            )
            pair_rewards.append(beta * ratio / (len(ids) if reward == "mean" else 1))
            pair_lengths.append(len(ids))
        want_rewards.append(pair_rewards)
        lengths.append(pair_lengths)
    for row, (rc, rr), (nc, nr) in zip(rows, want_rewards, lengths, strict=True):
        assert math.isclose(row["reward_chosen"], rc, rel_tol=2e-3, abs_tol=2e-5)
        assert math.isclose(row["reward_rejected"], rr, rel_tol=2e-3, abs_tol=2e-5)
        assert (row["chosen_tokens"], row["rejected_tokens"]) == (nc, nr)
    judged = [(r["reward_chosen"] > r["reward_rejected"]) for r in rows]
    sized = [(nc < nr) for nc, nr in lengths if nc != nr]
    assert 0 < np.mean(sized) < 1 and len(sized) < len(lengths)  # both ways, and ties
    assert result["judge_pairs"] == len(rows)  # perturbed weights: no two rewards tie
    assert result["judge_agreement"] == pytest.approx(np.mean(judged))
    assert result["length_pairs"] == len(sized)
    assert result["shorter_agreement"] == pytest.approx(np.mean(sized))
    assert result["longer_agreement"] == pytest.approx(1 - np.mean(sized))
    rule = "shorter" if np.mean(sized) >= 0.5 else "longer"
    assert result["length_rule"] == rule
    against = [
        j
        for j, (nc, nr) in zip(judged, lengths, strict=True)
        if nc != nr and j != ((nc < nr) if rule == "shorter" else (nc > nr))
    ]
    assert result["judge_against_length_rule_pairs"] == len(against)
    if against:
        assert result["judge_against_length_rule"] == pytest.approx(np.mean(against))
    rule_agreement = max(np.mean(sized), 1 - np.mean(sized))
    assert result["judge_beats_length_rule"] == (np.mean(judged) > rule_agreement)
    line = spa.describe_judge_check(result)
    assert line.startswith(f"judge check on {len(rows)} held-out seed pairs")
    assert ("WARNING" in line) == (not result["judge_beats_length_rule"])


def test_gold_agreement_of_scores_each_side_with_its_own_stop_flag():
    """The self-labels' agreement with a rule judge, by hand: a pair the gold judge agrees
    with, one it disagrees with, one it disagrees with only because the chosen side was cut
    (its own EOS flag counts, not the other side's), one it ties (not counted)."""
    import types

    lines = []
    ctx = types.SimpleNamespace(
        config=types.SimpleNamespace(eval=types.SimpleNamespace(judge="demo-checker")),
        log=lines.append,
    )

    def pair(chosen, rejected, chosen_eos=True, rejected_eos=True, answer="Paris"):
        return {
            "prompt": "Capital of France?",
            "chosen": chosen,
            "rejected": rejected,
            "chosen_eos": chosen_eos,
            "rejected_eos": rejected_eos,
            "answer": answer,
        }

    records = [
        pair("Paris.", "London."),  # gold 2 against 1: agrees
        pair("Rome.", "Paris."),  # 1 against 2: disagrees
        pair("Paris.", "Paris.", chosen_eos=False),  # 1 against 2: disagrees
        pair("Oslo.", "Bergen."),  # 1 against 1: a tie
    ]
    assert spa.gold_agreement_of(ctx, records) == {
        "gold_agreement": pytest.approx(1 / 3),
        "gold_separated": 3,
    }
    flipped = [pair("Paris.", "Paris.", rejected_eos=False)]  # the rejected one was cut
    assert spa.gold_agreement_of(ctx, flipped) == {"gold_agreement": 1.0, "gold_separated": 1}
    assert spa.gold_agreement_of(ctx, []) == {}
    assert lines == []
    no_answer = [{**records[0], "answer": None}]
    assert spa.gold_agreement_of(ctx, no_answer) == {}
    assert lines == [
        "self-label agreement not measured: record 0 (id None) has no 'answer' field to check"
    ]
    ctx.config.eval.judge = "model:some/reward-model"  # not a rule judge: nothing to measure
    assert spa.gold_agreement_of(ctx, records) == {}


def test_the_rounds_take_their_prompts_in_order_and_stop_when_none_are_left():
    prompts = [{"id": k} for k in range(6)]
    lines = []
    cfg = load_config(None, ["spa.rounds=4", "spa.prompts_per_round=[2,3]"])
    got = [(i, [p["id"] for p in ps]) for i, ps in spa._round_prompts(cfg, prompts, lines.append)]
    # round 1 takes 2, round 2 takes 3, round 3 (the last size repeats) finds 1 of 3
    assert got == [(1, [0, 1]), (2, [2, 3, 4]), (3, [5])]
    assert lines == [
        "round 3: only 1 of 3 prompts left; using them",
        "round 4: no unused prompts left (6 in all); stopping",
    ]
    lines.clear()
    cfg = load_config(None, ["spa.rounds=2", "spa.prompts_per_round=[3]"])
    got = [(i, len(ps)) for i, ps in spa._round_prompts(cfg, prompts, lines.append)]
    assert got == [(1, 3), (2, 3)] and lines == []  # exactly enough: nothing said


def test_a_round_s_summary_row_reads_its_finished_stages(tmp_path):
    from jaxalign.algorithms.rounds import RoundRunner

    runner = RoundRunner(tmp_path / "run", {"run": {"seed": 1}}, log=lambda m: None)
    stage = {
        "round_0/train": {
            "pairs": 40,
            "mean/spa/flagged_fraction": None,
            "final/rewards/margin": 0.5,
        },
        "round_1/judge": {
            "count/kept": 7,
            "count/considered": 10,
            "gold_agreement": 0.75,
            "margin_mean": 0.25,
        },
        "round_1/train": {
            "pairs": 99,
            "mean/spa/flagged_fraction": 0.125,
            "final/rewards/margin": 1.5,
        },
        "round_1/eval": {
            "win_rate": 0.625,
            "win_ci": [0.5, 0.75],
            "gold_score": 1.25,
            "mean_words": 12.0,
        },
        "round_2/judge": {},  # an older run's judge: no counts
    }
    runner.state["stages"] = {k: {"result": v, "seconds": 1.0} for k, v in stage.items()}
    assert spa._round_row(runner, 0) == {
        "round": 0,
        "pairs": 40,
        "flagged_fraction": None,
        "train_reward_margin": 0.5,
    }
    assert spa._round_row(runner, 1) == {
        "round": 1,
        "pairs": 7,
        "skipped": 3,
        "gold_agreement": 0.75,
        "margin_mean": 0.25,
        "flagged_fraction": 0.125,
        "train_reward_margin": 1.5,
        "win_rate": 0.625,
        "win_ci": "0.50-0.75",
        "gold_score": 1.25,
        "mean_words": 12.0,
    }  # a round's pairs are the judge's kept ones, not the train stage's count
    assert spa._round_row(runner, 2) == {
        "round": 2,
        "pairs": None,
        "skipped": 0,
        "gold_agreement": None,
        "margin_mean": None,
    }
    assert spa._round_row(runner, 3) == {"round": 3}


def test_the_judge_check_s_log_line_says_what_it_measured_and_warns_when_length_wins():
    result = {
        "pairs": 12,
        "judge_pairs": 10,
        "judge_agreement": 0.7,
        "length_rule": "shorter",
        "length_rule_agreement": 0.8,
        "judge_against_length_rule_pairs": 3,
        "judge_against_length_rule": None,
        "judge_beats_length_rule": False,
    }
    assert spa.describe_judge_check(result) == (
        "judge check on 12 held-out seed pairs: π_0's implicit reward orders 70% as labelled; "
        "the rule 'the shorter one is better' 80%; where the two disagree (3 pairs) the judge "
        "is right on —. WARNING: the judge does not beat the length rule, so the rounds' "
        "self-labels carry little beyond a length preference (docs/alignment_benchmark.md, "
        "seventh pass); a larger seed or a stronger model may be needed"
    )
    better = {
        **result,
        "judge_agreement": 0.9,
        "judge_beats_length_rule": True,
        "judge_against_length_rule": 2 / 3,
        "length_rule": "longer",
    }
    assert spa.describe_judge_check(better) == (
        "judge check on 12 held-out seed pairs: π_0's implicit reward orders 90% as labelled; "
        "the rule 'the longer one is better' 80%; where the two disagree (3 pairs) the judge "
        "is right on 67%"
    )
    assert spa.describe_judge_check({**result, "judge_pairs": 0}) == (
        "judge check: no held-out seed pair has two different rewards"
    )
