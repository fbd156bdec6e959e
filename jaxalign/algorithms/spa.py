"""SPA: Spread Preference Annotation (Kim et al., arXiv 2406.04412).

Round 0 trains ``π_0`` by DPO on a small set of human-labelled seed pairs
(reference ``π_init``, 3 epochs). Each round ``i ≥ 1`` then

1. **samples** two responses per new prompt from ``π_{i-1}`` (temperature 0.7,
   top-p 1.0, up to 300 new tokens);
2. **judges** them with the model's own implicit reward against ``π_init``,
   ``r(x,y) = β·(log π_{i-1}(y|x) − log π_init(y|x))``, recomputed by a forward
   pass; the higher-reward response is ``chosen`` and the pair keeps its margin
   and ``p = σ(r_c − r_r)``;
3. **trains** ``π_i`` from ``π_{i-1}`` (reference ``π_{i-1}``, or ``π_0`` with
   ``spa.reference_policy = seed``; 1 epoch) with DPO plus self-refinement
   (:mod:`jaxalign.refinement`);
4. **evaluates** ``π_i`` against ``π_init`` with a gold judge, when configured.

Each step is a stage: a function from its inputs (the run's context, the policy
it starts from, prompts or candidates) to its artifacts and outputs, run at most
once by :class:`jaxalign.algorithms.rounds.RoundRunner`, so a killed run resumes
at the stage it was in. The work itself is done by the service modules: sampling
(:mod:`jaxalign.generation`), log-probs (:mod:`jaxalign.scoring`), the judge
(:mod:`jaxalign.judging`), training (:mod:`jaxalign.loop` with the loss of
:mod:`jaxalign.refinement`) and checkpoints (:mod:`jaxalign.checkpoint`). Artifacts per round:
``candidates.jsonl``, ``pairs.jsonl`` (with margins and ``p``), ``model/``
(parameters), ``eval.jsonl``, and ``model_hf/`` (a Hugging Face folder with a model card)
for the rounds ``run.export_hf`` selects; run-wide ``metrics.jsonl``, ``summary.json`` and
``summary.md``.

Multi-process runs (a TPU pod slice, several GPU hosts) run the same stages on
every process: sampling and training use global arrays on the mesh, with each
process feeding its own rows of every batch; every process holds the same
prompts, pairs and parameters, so all reach the same judgements; only process
0 logs and writes files (see :mod:`jaxalign.algorithms.rounds`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from flax import nnx

from jaxalign import checkpoint, judging, loop, refinement, scoring, training
from jaxalign.algorithms import stages
from jaxalign.algorithms.rounds import RoundRunner, atomic_write_jsonl, finish_run, read_jsonl
from jaxalign.algorithms.stages import RunContext, eval_stage
from jaxalign.config import Config
from jaxalign.data.pairs import pair_batches
from jaxalign.data.records import read_preference_records, read_prompt_records
from jaxalign.generation import encode_prompts, sample_texts
from jaxalign.report import SUMMARY_COLUMNS, format_table, write_report


def run(config: Config, *, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) SPA as configured; returns the round summary."""
    start = time.perf_counter()
    ctx, runner = stages.start_run(config, log)
    cfg = ctx.config
    seed_pairs, seed_report = read_preference_records(cfg.data.seed_pairs, cfg.data.on_bad_record)
    prompts, prompt_report = read_prompt_records(cfg.data.prompts, cfg.data.on_bad_record)
    ctx.log(seed_report.summary())
    ctx.log(prompt_report.summary())
    evaluation = stages.eval_setup(ctx)

    def evaluate(i: int, policy: nnx.State) -> None:
        if cfg.eval.enabled:
            runner.stage(
                i, "eval", lambda d: eval_stage(ctx, evaluation, policy, ctx.init_params, d)
            )

    seed_pairs, held_out = split_seed_pairs(seed_pairs, cfg.spa.seed_holdout)
    if held_out:
        ctx.log(
            f"spa.seed_holdout={cfg.spa.seed_holdout}: {len(held_out)} of "
            f"{len(seed_pairs) + len(held_out)} seed pairs held out of round 0 to check its judge"
        )
    # Round 0: π_0 = DPO on the seed pairs, starting from (and referenced to) π_init.
    policy = runner.produce(
        0,
        "train",
        lambda d: train_stage(
            ctx, 0, ctx.init_params, seed_pairs, d, _trained_adapters(ctx, runner, -1)
        ),
        load=lambda result: _trained_policy(ctx, result),
    )
    if held_out:
        checked = runner.stage(
            0, "judge_check", lambda d: judge_check_stage(ctx, policy, held_out, d)
        )
        ctx.log(describe_judge_check(checked))
    evaluate(0, policy)
    # Round i ≥ 1: π_i from π_{i-1} on new prompts it answered and labelled itself.
    for i, round_prompts in _round_prompts(cfg, prompts, ctx.log):
        policy = spa_round(ctx, runner, i, policy, round_prompts)
        evaluate(i, policy)

    rows = stages.baseline_row(runner, "round", "SFT") if cfg.eval.enabled else []
    rows += [_round_row(runner, i) for i in range(cfg.spa.rounds + 1) if runner.done(i, "train")]
    table = format_table(rows, SUMMARY_COLUMNS)
    stages.export_models(
        ctx, runner, lambda i: _trained_policy(ctx, runner.result(i, "train")), table
    )
    seconds = time.perf_counter() - start
    summary = finish_run(
        runner, rows, table, title="SPA run summary", rows_key="rounds", seconds=seconds
    )
    ctx.metrics.close()
    if isinstance(runner.run_dir, pathlib.Path):
        ctx.log(f"\nreport: {write_report(runner.run_dir)}")
    else:  # the HTML report reads local files: `jaxalign report` on a copy of the run
        ctx.log(
            f"\nreport: copy {runner.run_dir} to a local folder and run `jaxalign report` on it"
        )
    ctx.log(f"run directory: {runner.run_dir}  ({seconds:.0f}s this invocation)")
    return summary


def spa_round(
    ctx: RunContext, runner: RoundRunner, i: int, policy: nnx.State, prompts: list[dict]
) -> nnx.State:
    """Round ``i ≥ 1`` from ``policy`` = π_{i-1}: sample → judge → train; returns π_i.

    The sampler is π_{i-1} (paper) or, with ``spa.sample_policy = seed``, π_0; the judge is
    π_{i-1} (paper) or, with ``spa.judge_policy = seed``, π_0; the training's reference is
    π_{i-1} (paper) or, with ``spa.reference_policy = seed``, π_0."""
    if runner.done(i, "train"):
        return _trained_policy(ctx, runner.result(i, "train"))
    sampler, judge = round_policies(ctx, runner, i, policy)
    sampled = runner.stage(i, "sample", lambda d: sample_stage(ctx, i, sampler, prompts, d))
    sampled_by_judge = judge is sampler
    judged = runner.stage(
        i, "judge", lambda d: judge_stage(ctx, judge, sampled["candidates"], d, sampled_by_judge)
    )
    pairs = read_jsonl(judged["pairs"])
    adapters = _trained_adapters(ctx, runner, i - 1)
    reference, reference_adapters = policy, adapters
    if i > 1 and ctx.config.spa.reference_policy == "seed":
        loaded = [m for m in (sampler, judge) if m is not policy]  # π_0, where loaded already
        reference = loaded[0] if loaded else _trained_policy(ctx, runner.result(0, "train"))
        reference_adapters = _trained_adapters(ctx, runner, 0)
    return runner.produce(
        i,
        "train",
        lambda d: train_stage(
            ctx,
            i,
            policy,
            pairs,
            d,
            adapters,
            reference=reference,
            reference_adapters=reference_adapters,
        ),
        load=lambda result: _trained_policy(ctx, result),
    )


def round_policies(
    ctx: RunContext, runner: RoundRunner, i: int, policy: nnx.State
) -> tuple[nnx.State, nnx.State]:
    """``(sampler, judge)`` of round ``i``: the model that samples its candidates and the one
    whose implicit reward labels them. Each is ``policy`` = π_{i-1} (paper), or π_0, the seed
    DPO's model, with ``spa.sample_policy = seed`` / ``spa.judge_policy = seed`` (the same
    object when both are π_0, so the judge can take its log-probs from the sampler)."""
    spa_config = ctx.config.spa
    seed = None
    if i > 1 and "seed" in (spa_config.sample_policy, spa_config.judge_policy):
        seed = _trained_policy(ctx, runner.result(0, "train"))
    sampler = seed if seed is not None and spa_config.sample_policy == "seed" else policy
    judge = seed if seed is not None and spa_config.judge_policy == "seed" else policy
    return sampler, judge


def _round_prompts(cfg: Config, prompts: list[dict], log) -> Iterator[tuple[int, list[dict]]]:
    """``(i, prompts of round i)`` for rounds 1.. ``spa.rounds``: each round takes the next
    ``spa.prompts_for_round(i)`` unused prompts, and the rounds stop when none are left."""
    cursor = 0
    for i in range(1, cfg.spa.rounds + 1):
        want = cfg.spa.prompts_for_round(i)
        round_prompts = prompts[cursor : cursor + want]
        cursor += want
        if not round_prompts:
            log(f"round {i}: no unused prompts left ({len(prompts)} in all); stopping")
            return
        if len(round_prompts) < want:
            log(f"round {i}: only {len(round_prompts)} of {want} prompts left; using them")
        yield i, round_prompts


def _trained_policy(ctx: RunContext, train_result: dict) -> nnx.State:
    """The parameters a finished train stage saved (with LoRA: the loaded model with the
    stage's adapters merged in)."""
    if "lora" in train_result:
        spec = _lora_spec(ctx)
        return spec.merged(ctx, spec.load(train_result["lora"]))
    return stages.load_params(train_result["model"], ctx.init_params)


def _trained_adapters(ctx: RunContext, runner: RoundRunner, i: int) -> nnx.State | None:
    """π_i's LoRA adapters (``None`` without ``spa.lora_rank``); before round 0, the fresh ones."""
    spec = _lora_spec(ctx)
    if spec is None:
        return None
    return spec.init if i < 0 else spec.load(runner.result(i, "train")["lora"])


# ----------------------------------------------------------------------------- 0. judge check


def split_seed_pairs(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: ``ceil(fraction · N)`` of the ``N`` seed pairs held out of round 0
    (``spa.seed_holdout``), each in its file order: the pairs whose ``id`` (index when it has
    none) hashes lowest, so the split does not depend on the order of the file's lines."""
    count = math.ceil(fraction * len(pairs) - 1e-9)
    if count == 0:
        return list(pairs), []
    if count >= len(pairs):
        raise ValueError(
            f"spa.seed_holdout={fraction} holds out all {len(pairs)} seed pairs; round 0 needs "
            "at least one to train on"
        )

    def rank(k: int) -> bytes:
        identity = json.dumps(pairs[k].get("id", k), sort_keys=True).encode()
        return hashlib.blake2b(identity, digest_size=8).digest()

    held = set(sorted(range(len(pairs)), key=rank)[:count])
    return (
        [p for k, p in enumerate(pairs) if k not in held],
        [p for k, p in enumerate(pairs) if k in held],
    )


def _record_logps(ctx: RunContext, params: nnx.State, records: list[dict], desc: str):
    """``[N, 2]`` summed log-probs of each record's two responses under ``params``
    (:func:`jaxalign.scoring.response_logps`, batched and sharded as training is)."""
    return scoring.response_logps(
        ctx.graphdef,
        params,
        records,
        ctx.tokenizer,
        ctx.config,
        ctx.mesh,
        progress=ctx.progress,
        desc=desc,
    )


def judge_check(ctx: RunContext, judge: nnx.State, pairs: list[dict]) -> tuple[list[dict], dict]:
    """How well ``judge``'s implicit reward (``spa.judge_reward``, as the rounds compute it)
    orders labelled pairs it was not trained on, against the length rules.

    Returns one row per pair (its rewards and scored token counts) and the counts:
    ``judge_agreement`` over the pairs whose two rewards differ; ``shorter_agreement`` and
    ``longer_agreement`` ("the shorter / longer response is the better one") over the pairs
    whose two lengths differ (in tokens as scored, after ``data.max_response_tokens``);
    ``length_rule``, the better of the two on these pairs; ``judge_against_length_rule``, the
    judge's agreement over the pairs where it and that rule disagree; and
    ``judge_beats_length_rule``. A judge that does not beat the length rule can label the
    rounds' pairs with little more than a length preference.
    """
    cfg = ctx.config
    records = [p for p in pairs if p["chosen"] != p["rejected"]]  # a judge cannot order these
    if not records:
        return [], {"pairs": 0}

    tokens = scoring.response_token_counts(records, ctx.tokenizer, cfg)
    rewards = judging.implicit_reward(
        _record_logps(ctx, judge, records, "judge check: log π_0"),
        _record_logps(ctx, ctx.init_params, records, "judge check: log π_init"),
        cfg.train.beta,
        tokens if cfg.spa.judge_reward == "mean" else None,
    )
    judged = rewards[:, 0] != rewards[:, 1]
    judge_right = rewards[:, 0] > rewards[:, 1]
    sized = tokens[:, 0] != tokens[:, 1]
    shorter_right = tokens[:, 0] < tokens[:, 1]

    def share(hits, where) -> float | None:
        return float(np.mean(hits[where])) if where.any() else None

    shorter, longer = share(shorter_right, sized), share(~shorter_right, sized)
    rule = "shorter" if (shorter or 0.0) >= (longer or 0.0) else "longer"
    rule_right = shorter_right if rule == "shorter" else ~shorter_right
    # Where the judge and the rule order a pair differently (neither ties), one is right.
    against = judged & sized & (judge_right != rule_right)
    judge_agreement = share(judge_right, judged)
    rule_agreement = shorter if rule == "shorter" else longer
    result = {
        "pairs": len(records),
        "judge_pairs": int(judged.sum()),
        "judge_agreement": judge_agreement,
        "length_pairs": int(sized.sum()),
        "shorter_agreement": shorter,
        "longer_agreement": longer,
        "length_rule": rule,
        "length_rule_agreement": rule_agreement,
        "judge_against_length_rule_pairs": int(against.sum()),
        "judge_against_length_rule": share(judge_right, against),
        "judge_beats_length_rule": bool(
            judge_agreement is not None and judge_agreement > (rule_agreement or 0.0)
        ),
    }
    rows = [
        {
            "id": r.get("id", k),
            "reward_chosen": float(rewards[k, 0]),
            "reward_rejected": float(rewards[k, 1]),
            "chosen_tokens": int(tokens[k, 0]),
            "rejected_tokens": int(tokens[k, 1]),
        }
        for k, r in enumerate(records)
    ]
    return rows, result


def judge_check_stage(
    ctx: RunContext, judge: nnx.State, pairs: list[dict], out: pathlib.Path
) -> dict:
    """Writes :func:`judge_check`'s rows to ``judge_check.jsonl``; returns its counts."""
    rows, result = judge_check(ctx, judge, pairs)
    path = out / "judge_check.jsonl"
    atomic_write_jsonl(path, rows)
    return {"rows": str(path), **result}


def describe_judge_check(result: dict) -> str:
    """The log line of a judge check, with a warning when the judge does not beat length."""
    if not result.get("judge_pairs"):
        return "judge check: no held-out seed pair has two different rewards"

    def pct(x):
        return "—" if x is None else f"{x:.0%}"

    line = (
        f"judge check on {result['pairs']} held-out seed pairs: π_0's implicit reward orders "
        f"{pct(result['judge_agreement'])} as labelled; the rule 'the {result['length_rule']} "
        f"one is better' {pct(result['length_rule_agreement'])}; where the two disagree "
        f"({result['judge_against_length_rule_pairs']} pairs) the judge is right on "
        f"{pct(result['judge_against_length_rule'])}"
    )
    if not result["judge_beats_length_rule"]:
        line += (
            ". WARNING: the judge does not beat the length rule, so the rounds' self-labels "
            "carry little beyond a length preference (docs/alignment_benchmark.md, seventh "
            "pass); a larger seed or a stronger model may be needed"
        )
    return line


# ----------------------------------------------------------------------------- 1. sample


def sample_candidates(
    ctx: RunContext, round_index: int, policy: nnx.State, prompts: list[dict]
) -> list[dict]:
    """``spa.samples_per_prompt`` responses to each prompt from ``policy`` (paper: 2, at
    temperature 0.7, top-p 1.0): each prompt record with ``prompt_ids`` (the exact prompt
    tokens decoded from) and ``responses``, a list of ``{text, token_ids, finished,
    truncated, num_tokens}``.

    Prompts are encoded as the judge and the trainer encode them (``data.use_chat_template``,
    the last ``data.max_prompt_tokens`` tokens), and each prompt's randomness is keyed by
    its id, so a response does not depend on the batch it was decoded in.
    """
    cfg = ctx.config
    texts = [r["prompt"] for r in prompts]
    encoding = {
        "use_chat_template": cfg.data.use_chat_template,
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
    }
    completions = sample_texts(
        ctx.model(policy),
        ctx.tokenizer,
        texts,
        stages.sampling_config(
            ctx, n=cfg.spa.samples_per_prompt, return_logprobs=cfg.spa.judge_from_sampler
        ),
        seed=cfg.run.seed * 1000 + round_index,
        batch_size=cfg.run.generate_batch_size,
        mesh=ctx.mesh,
        progress=ctx.progress,
        identities=[r["id"] for r in prompts],
        **encoding,
    )
    prompt_ids = encode_prompts(ctx.tokenizer, texts, sys.maxsize, **encoding)
    return [
        {
            **rec,
            "prompt_ids": ids,
            "responses": [
                {
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finished": c.finished,
                    "truncated": c.truncated,
                    "num_tokens": len(c.token_ids),
                    **({} if c.logprobs is None else {"logprobs": c.logprobs}),
                }
                for c in comps
            ],
        }
        for rec, ids, comps in zip(prompts, prompt_ids, completions, strict=True)
    ]


def sample_stage(
    ctx: RunContext, round_index: int, policy: nnx.State, prompts: list[dict], out: pathlib.Path
) -> dict:
    """Writes :func:`sample_candidates` to ``candidates.jsonl``."""
    records = sample_candidates(ctx, round_index, policy, prompts)
    path = out / "candidates.jsonl"
    atomic_write_jsonl(path, records)
    return {
        "candidates": str(path),
        "prompts": len(records),
        "responses": sum(len(r["responses"]) for r in records),
        "truncated_responses": sum(x["truncated"] for r in records for x in r["responses"]),
    }


# ----------------------------------------------------------------------------- 2. judge


# Fields of a candidate record that are not the prompt's own (kept on its pair).
_CANDIDATE_FIELDS = ("id", "prompt", "prompt_ids", "responses")


def _scoring_records(candidates: list[dict]) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """Every candidate response as one side of a two-response record for the scorer, and
    for each record ``(prompt k, candidate a, candidate b)``: candidates ``0,1``, ``2,3``, ...
    (an odd last one is paired with candidate 0)."""
    records, slots = [], []
    for k, r in enumerate(candidates):
        responses = r["responses"]
        for a in range(0, len(responses), 2):
            b = a + 1 if a + 1 < len(responses) else 0
            record = {"id": r["id"], "prompt": r["prompt"]}
            if "prompt_ids" in r:
                record["prompt_ids"] = r["prompt_ids"]
            for side, x in (("chosen", responses[a]), ("rejected", responses[b])):
                record[side] = x["text"]
                record[f"{side}_eos"] = x["finished"]
                if "token_ids" in x:
                    record[f"{side}_ids"] = x["token_ids"]
            records.append(record)
            slots.append((k, a, b))
    return records, slots


def _sampler_logps(ctx: RunContext, candidates: list[dict], slots) -> np.ndarray | None:
    """``[S, 2]`` summed log-probs of each scoring row's two responses as the sampler gave
    them, or None when they are not exactly what a forward pass would score (a response
    without them, one longer than ``data.max_response_tokens``, or a finished one whose
    end-of-turn token the pair batch would add)."""
    ends = set(ctx.tokenizer.eos_token_ids)
    limit = ctx.config.data.max_response_tokens
    out = np.zeros((len(slots), 2), np.float64)
    for s, (k, a, b) in enumerate(slots):
        for side, j in enumerate((a, b)):
            response = candidates[k]["responses"][j]
            ids = response.get("token_ids")
            if "logprobs" not in response or ids is None or len(ids) > limit:
                return None
            if response["finished"] and not (ids and ids[-1] in ends):
                return None
            out[s, side] = float(np.sum(np.asarray(response["logprobs"], np.float64)))
    return out


def candidate_rewards(
    ctx: RunContext, judge: nnx.State, candidates: list[dict], sampled_by_judge: bool = False
) -> list[list]:
    """The implicit reward of every candidate: ``rewards[k][j]`` for response ``j`` of prompt
    ``k``, ``β·(log π_judge(y|x) − log π_init(y|x))`` with summed log-probs of the exact
    sampled tokens from forward passes (:func:`jaxalign.scoring.response_logps`), divided by
    the response's token count with ``spa.judge_reward = mean``.

    ``sampled_by_judge``: the candidates were sampled by the judge's own model, so with
    ``spa.judge_from_sampler`` its log-probs come from the sampler and only π_init runs."""
    cfg = ctx.config
    records, slots = _scoring_records(candidates)

    num_tokens = None
    if cfg.spa.judge_reward == "mean":
        num_tokens = scoring.response_token_counts(records, ctx.tokenizer, cfg)
    judge_logps = None
    if sampled_by_judge and cfg.spa.judge_from_sampler:
        judge_logps = _sampler_logps(ctx, candidates, slots)
    if judge_logps is None:
        judge_logps = _record_logps(ctx, judge, records, "judge: log π_{i-1}")
    per_slot = judging.implicit_reward(
        judge_logps,
        _record_logps(ctx, ctx.init_params, records, "judge: log π_init"),
        cfg.train.beta,
        num_tokens,
    )
    rewards = [[0.0] * len(r["responses"]) for r in candidates]
    for (k, a, b), (r_a, r_b) in zip(slots, per_slot.tolist(), strict=True):
        rewards[k][a], rewards[k][b] = r_a, r_b
    return rewards


def judge_candidates(
    ctx: RunContext, judge: nnx.State, candidates: list[dict], sampled_by_judge: bool = False
) -> tuple[list[dict], judging.PairCounts]:
    """Candidate records → preference-pair records, labelled by the judge's implicit reward.

    Every candidate gets its reward (:func:`candidate_rewards`); a prompt's pair is its
    highest-reward candidate against its lowest (with SPA's two samples, those two), a
    response cut at the token limit treated as ``spa.truncated_policy`` says
    (:func:`jaxalign.judging.make_pairs`), after the round's length trend is taken out of
    the rewards with ``spa.length_control = regress``
    (:func:`jaxalign.judging.length_controlled_rewards`; each record then carries the slope
    ``length_slope``, and its rewards and margin are the adjusted ones); with
    ``spa.keep_fraction < 1`` only the pairs with
    the largest margins stay (:func:`jaxalign.judging.most_confident`). A pair record is a
    :class:`jaxalign.judging.JudgedPair` (margin, ``p``), the exact token ids of its prompt and
    responses, and the prompt record's other fields (``answer``, ``constraints``, ...).
    Returns the records and what was kept and skipped.
    """
    cfg = ctx.config
    rewards = candidate_rewards(ctx, judge, candidates, sampled_by_judge)
    length_slope = None
    if cfg.spa.length_control == "regress":
        # The slope is fitted on the responses the pair choice ranks by reward: with
        # truncated responses skipped or rejected, the finished ones.
        rewards, length_slope = judging.length_controlled_rewards(
            rewards,
            [[x["num_tokens"] for x in r["responses"]] for r in candidates],
            [
                [x["finished"] or cfg.spa.truncated_policy == "keep" for x in r["responses"]]
                for r in candidates
            ],
        )
    pairs, counts = judging.make_pairs(
        [r["id"] for r in candidates],
        [r["prompt"] for r in candidates],
        [
            [judging.Candidate(x["text"], x["finished"], x["num_tokens"]) for x in r["responses"]]
            for r in candidates
        ],
        rewards,
        truncated_policy=cfg.spa.truncated_policy,
    )
    if cfg.spa.keep_fraction < 1.0:
        kept = judging.most_confident(pairs, cfg.spa.keep_fraction)
        counts.below_keep_fraction = len(pairs) - len(kept)
        counts.kept = len(kept)
        pairs = kept
    by_id = {r["id"]: r for r in candidates}
    records = []
    for pair in pairs:
        source = by_id[pair.id]
        record = pair.to_record()
        record.update({k: v for k, v in source.items() if k not in _CANDIDATE_FIELDS})
        if length_slope is not None:  # the rewards are r − b·n (spa.length_control)
            record["length_slope"] = length_slope
        if "prompt_ids" in source:
            record["prompt_ids"] = source["prompt_ids"]
        for side in ("chosen", "rejected"):
            response = source["responses"][record[f"{side}_index"]]
            if "token_ids" in response:
                record[f"{side}_ids"] = response["token_ids"]
        records.append(record)
    return records, counts


def gold_agreement_of(ctx: RunContext, records: list[dict]) -> dict:
    """How often the self-labels agree with ``eval.judge`` when that is a rule judge whose
    fields (``answer``, ``constraints``, ...) the pair records carry; ``{}`` otherwise."""
    name = ctx.config.eval.judge
    if not records or name not in judging.RULE_JUDGES:
        return {}
    gold = judging.get_rule_judge(name)
    prompts = [r["prompt"] for r in records]
    try:
        scores = {
            side: gold(
                prompts,
                [r[side] for r in records],
                records,
                finished=[r[f"{side}_eos"] for r in records],
            )
            for side in ("chosen", "rejected")
        }
    except ValueError as e:  # the prompts carry no gold fields for this judge
        ctx.log(f"self-label agreement not measured: {e}")
        return {}
    agreement, separated = judging.gold_agreement(scores["chosen"], scores["rejected"])
    return {"gold_agreement": agreement, "gold_separated": separated}


def judge_stage(
    ctx: RunContext,
    judge: nnx.State,
    candidates_path: str,
    out: pathlib.Path,
    sampled_by_judge: bool = False,
) -> dict:
    """Writes :func:`judge_candidates` of ``candidates.jsonl`` to ``pairs.jsonl``; with a rule
    gold judge whose fields the prompts carry, also how often the self-labels agree with it."""
    records, counts = judge_candidates(ctx, judge, read_jsonl(candidates_path), sampled_by_judge)
    path = out / "pairs.jsonl"
    atomic_write_jsonl(path, records)
    return {
        "pairs": str(path),
        **{f"count/{k}": v for k, v in dataclasses.asdict(counts).items()},
        "margin_mean": float(np.mean([r["margin"] for r in records])) if records else None,
        "p_mean": float(np.mean([r["p"] for r in records])) if records else None,
        **(
            {"length_slope": records[0]["length_slope"]}
            if records and "length_slope" in records[0]
            else {}
        ),
        **gold_agreement_of(ctx, records),
    }


# ----------------------------------------------------------------------------- 3. train


def train_stage(
    ctx: RunContext,
    round_index: int,
    policy: nnx.State,
    records: list[dict],
    out: pathlib.Path,
    adapters: nnx.State | None = None,
    *,
    reference: nnx.State | None = None,
    reference_adapters: nnx.State | None = None,
) -> tuple[dict, nnx.State]:
    """π_i from ``policy`` = π_{i-1} (π_init in round 0) on the round's pairs, with reference
    ``reference`` (default ``policy``: π_{i-1}; ``spa.reference_policy = seed``: π_0); saves it
    to ``model/`` and returns the stage's result and π_i.

    Round 0 (and every round with ``spa.refine`` off) is DPO, its reference log-probs
    precomputed once (:func:`jaxalign.scoring.with_reference_logps`), so training holds
    one model. Rounds ≥ 1 add self-refinement (:func:`jaxalign.refinement.spa_loss_fn`),
    which needs the reference's per-token logits: π_{i-1} runs on the fly, frozen.

    With ``spa.lora_rank``, ``adapters`` are π_{i-1}'s (round 0: the fresh ones, ``B = 0``)
    and ``policy`` is the loaded model with them merged in: the adapters train, from
    there, on the frozen loaded model, the reference is the same base with a frozen copy of
    ``reference_adapters`` (default ``adapters``), and the stage saves them to ``lora/``.
    """
    cfg = ctx.config
    spa = cfg.spa
    spec = _lora_spec(ctx)
    if spec is not None and adapters is None:
        raise ValueError("spa.lora_rank is set: train_stage needs π_{i-1}'s adapters")
    reference = policy if reference is None else reference
    reference_adapters = adapters if reference_adapters is None else reference_adapters
    seed_round = round_index == 0
    epochs = spa.seed_epochs if seed_round else spa.round_epochs
    batches, build_report = pair_batches(records, ctx.tokenizer, cfg)
    if not batches:
        raise ValueError(f"round {round_index}: no usable preference pairs to train on")
    on_the_fly = not seed_round and spa.refine  # the reference runs beside the policy
    if not on_the_fly:
        batches = scoring.with_reference_logps(
            ctx.graphdef, reference, batches, cfg.train, progress=ctx.progress, mesh=ctx.mesh
        )
        loss_fn = training.dpo_loss_fn(cfg.train)
        frozen, algo_state, flag_after = None, None, None
    else:
        total_steps = epochs * len(batches)
        flag_after = int(spa.flag_warmup_ratio * total_steps)
        # The on-the-fly reference computes as the policy does (train.compute_dtype), so a
        # round's first step, where the two are the same weights, has margin 0.
        loss_fn = refinement.spa_loss_fn(
            None if spec else training.compute_graphdef(ctx.graphdef, policy, cfg.train),
            beta=cfg.train.beta,
            lam=spa.lambda_for_round(round_index),
            quantile=spa.noise_quantile,
            alpha=spa.smoothing_alpha,
            flag_after_step=flag_after,
            label_mode=spa.label_mode,
            chunk_size=cfg.train.logp_chunk_size,
        )
        frozen = reference  # run on the fly
        algo_state = refinement.init_margin_buffer(spa.margin_window)
    model, train_config = ctx.model(policy), cfg.train
    if spec is not None:
        model, train_config, loss_fn, frozen = _lora_training(
            ctx, spec, adapters, loss_fn, frozen, reference_adapters
        )
    result = loop.train(
        model,
        batches,
        train_config,
        ctx.mesh,
        loss_fn=loss_fn,
        epochs=epochs,
        frozen=frozen,
        algo_state=algo_state,
        metrics=ctx.metrics,
        tag=f"round_{round_index}/train",
        progress=ctx.progress,
        desc=f"round {round_index} train",
        seed=cfg.train.seed + round_index,
        checkpoint_dir=(out / "checkpoints") if cfg.run.checkpoint_every else None,
        save_every=cfg.run.checkpoint_every,
        log=ctx.log,
        frozen_forward=on_the_fly,
    )
    if result.per_pair:  # which pairs self-refinement flagged, at which step
        ids = [r["id"] for r in records]
        atomic_write_jsonl(
            out / "refinement.jsonl", [{"id": ids[p["index"]], **p} for p in result.per_pair]
        )
    saved = time.perf_counter()
    if spec is None:
        trained, params = {"model": str(out / "model")}, result.params
    else:
        trained, params = {"lora": str(out / "lora")}, spec.merged(ctx, result.params)
    checkpoint.save_params(next(iter(trained.values())), result.params)
    checkpoint_seconds = time.perf_counter() - saved
    summary = {
        **trained,
        "pairs": build_report.kept,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "truncated_prompts": build_report.truncated_prompts,
        "truncated_responses": build_report.truncated_responses,
        "flag_after_step": flag_after,
        "checkpoint_seconds": round(checkpoint_seconds, 3),
    }
    summary.update({f"final/{k}": v for k, v in result.last_metrics.items()})
    summary.update({f"mean/{k}": v for k, v in result.mean_metrics.items()})
    return summary, params


def _lora_spec(ctx: RunContext) -> stages.Adapters | None:
    """The LoRA adapters ``spa.lora_rank`` asks for; ``None`` for full fine-tuning."""
    spa = ctx.config.spa
    if not spa.lora:
        return None
    return stages.lora_adapters(ctx, spa.lora_rank, spa.lora_alpha, spa.lora_targets)


def _lora_training(
    ctx: RunContext,
    spec: stages.Adapters,
    adapters: nnx.State,
    loss_fn,
    frozen,
    reference_adapters: nnx.State,
):
    """What a LoRA train stage hands :func:`jaxalign.loop.train` in place of the full model's
    ``(model, train config, loss, frozen)``: the adapters are the trained model (compute
    dtype and remat apply to the frozen base), the base rides along frozen, and an
    on-the-fly reference (``frozen`` given) is the base with a copy of
    ``reference_adapters`` (π_{i-1}'s, or π_0's with ``spa.reference_policy = seed``).
    """
    train_config, loss_fn, frozen = stages.lora_training(
        ctx.model(ctx.init_params),
        ctx.config.train,
        loss_fn,
        spec.scaling,
        reference=reference_adapters if frozen is not None else None,
    )
    return nnx.merge(spec.graphdef, adapters), train_config, loss_fn, frozen


# ----------------------------------------------------------------------------- the summary


def _round_row(runner: RoundRunner, i: int) -> dict:
    row: dict[str, Any] = {"round": i}
    if runner.done(i, "judge"):
        j = runner.result(i, "judge")
        row.update(
            pairs=j.get("count/kept"),
            skipped=(j.get("count/considered") or 0) - (j.get("count/kept") or 0),
            gold_agreement=j.get("gold_agreement"),
            margin_mean=j.get("margin_mean"),
        )
    if runner.done(i, "train"):
        t = runner.result(i, "train")
        if i == 0:
            row["pairs"] = t.get("pairs")
        row["flagged_fraction"] = t.get("mean/spa/flagged_fraction")
        row["train_reward_margin"] = t.get("final/rewards/margin")
    if runner.done(i, "eval"):
        row.update(stages.eval_columns(runner.result(i, "eval")))
    return row
