"""PLE: Progressively Label Enhancement (Liu, Xu, Geng, arXiv 2408.02599, ICML 2025).

Algorithm 1 of the paper takes an SFT set ``D_sft``, a query set, principles
``p``, the base model, τ0, α and the number of iterations ``I``. With
``ple.sft_data`` set, the adapters are first fine-tuned on ``D_sft`` (each
record's ``chosen`` response; stage ``round_0/sft``) and the iterations, and
the evaluation's baseline, start from that model; without it they start from
the loaded model (e.g. an instruct model, which has had its SFT).

Each iteration ``t = 0, 1, ..., I-1`` of PLE

1. **samples**, for every query ``x``, a plain response ``y ~ π(·|x)`` and a
   principle-guided one ``y_p ~ π(·|x ⊕ p)`` (``p``: human-written principles);
2. **scores** both with a reward model (or a rule judge) and normalises the scores;
3. **routes** each pair by its reward gap against the threshold ``τ_t = τ0·α^t``
   (paper: τ0 = 0.2, α = 0.9): gap ``> τ_t`` → a *ranking* example, the better
   response ranked above the worse; gap ``≤ τ_t`` → *reward-weighted SFT* on both
   responses, each weighted by its normalised reward. Both losses condition on the
   plain ``x``, never on ``x ⊕ p``: the principles are a labelling device, the
   trained model must behave well without them;
4. **trains** LoRA adapters (paper: r = 8, α = 16, all linear modules;
   :mod:`jaxalign.models.lora`) on ``L = L_rank + c·L_sft``;
5. **evaluates** the merged model against the starting one with the gold judge.

As the threshold decays, more pairs count as clearly ordered and get the
contrastive loss; early on, when the model's two responses are close, it mostly
imitates both, weighted by how good they are. The numerics of steps 2-4 (threshold,
normalisation, routing, SFT weights, batches, the loss) and the choices the paper
leaves open are pure functions in :mod:`jaxalign.enhancement`. Adapters continue
from one iteration to the next; the optimizer restarts each iteration (as SPA's
rounds do).

As in :mod:`jaxalign.algorithms.spa`, each step is a stage, a function from its
inputs (the run's context, the adapters it starts from, prompts or candidates) to
its artifacts and outputs, run at most once by
:class:`jaxalign.algorithms.rounds.RoundRunner`; training is :func:`jaxalign.loop.train`
on the adapters, the base model frozen.

Artifacts per iteration ``round_t``: ``candidates.jsonl`` (both responses),
``scored.jsonl`` (rewards, gap, route), ``lora/`` (adapter parameters),
``eval.jsonl``, and ``model_hf/`` (the merged model as a Hugging Face folder with a model
card) for the iterations ``run.export_hf`` selects; run-wide ``metrics.jsonl``,
``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from jaxalign import checkpoint, enhancement, judging, loop
from jaxalign.algorithms import stages
from jaxalign.algorithms.rounds import RoundRunner, atomic_write_jsonl, finish_run, read_jsonl
from jaxalign.algorithms.stages import Adapters, RunContext, eval_stage
from jaxalign.config import Config
from jaxalign.data.records import read_preference_records, read_prompt_records
from jaxalign.generation import sample_texts
from jaxalign.report import PLE_SUMMARY_COLUMNS, format_table


def run(config: Config, *, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) PLE as configured; returns the iteration summary."""
    start = time.perf_counter()
    ctx, runner = stages.start_run(config, log)
    cfg, p = ctx.config, ctx.config.ple
    spec = _adapters(ctx)
    prompts, prompt_report = read_prompt_records(cfg.data.prompts, cfg.data.on_bad_record)
    ctx.log(prompt_report.summary())
    if not prompts:
        raise ValueError(f"{cfg.data.prompts}: no prompts to generate from")
    reward = functools.cache(lambda: _reward_judge(ctx))  # loaded when first needed
    shared = cfg.eval.enabled and cfg.eval.judge == p.reward  # one reward model in memory
    evaluation = stages.eval_setup(ctx, judge=reward() if shared else None)

    # Algorithm 1 starts from the model fine-tuned on D_sft, else from the loaded model;
    # evaluation compares against that starting model.
    adapters, baseline = spec.init, ctx.init_params
    if p.sft_data:
        adapters = runner.produce(
            0, "sft", lambda d: sft_stage(ctx, spec, d), load=lambda r: spec.load(r["lora"])
        )
        baseline = spec.merged(ctx, adapters)

    def evaluate(t: int, adapters: nnx.State) -> None:
        if cfg.eval.enabled:
            runner.stage(
                t,
                "eval",
                lambda d: eval_stage(ctx, evaluation, spec.merged(ctx, adapters), baseline, d),
            )

    for t in range(p.iterations):
        adapters = ple_iteration(ctx, runner, spec, t, adapters, _queries(p, prompts, t), reward)
        evaluate(t, adapters)

    rows = []
    if cfg.eval.enabled:
        rows = stages.baseline_row(runner, "iteration", "start (SFT)" if p.sft_data else "start")
    rows += [_iteration_row(runner, t) for t in range(p.iterations) if runner.done(t, "train")]
    table = format_table(rows, PLE_SUMMARY_COLUMNS)
    stages.export_models(
        ctx, runner, lambda t: spec.merged(ctx, spec.load(runner.result(t, "train")["lora"])), table
    )
    seconds = time.perf_counter() - start
    summary = finish_run(
        runner, rows, table, title="PLE run summary", rows_key="iterations", seconds=seconds
    )
    ctx.metrics.close()
    ctx.log(f"\nrun directory: {runner.run_dir}  ({seconds:.0f}s this invocation)")
    return summary


def ple_iteration(
    ctx: RunContext,
    runner: RoundRunner,
    spec: Adapters,
    t: int,
    adapters: nnx.State,
    prompts: list[dict],
    reward: Callable[[], judging.ResponseScorer],
) -> nnx.State:
    """Iteration ``t`` from ``adapters``: sample → score and route → train; returns the
    trained adapters."""
    if runner.done(t, "train"):
        return spec.load(runner.result(t, "train")["lora"])
    policy = spec.merged(ctx, adapters)
    sampled = runner.stage(t, "sample", lambda d: sample_stage(ctx, t, policy, prompts, d))
    scored = runner.stage(
        t, "score", lambda d: score_stage(ctx, t, reward(), sampled["candidates"], d)
    )
    return runner.produce(
        t,
        "train",
        lambda d: train_stage(ctx, spec, t, adapters, scored, d),
        load=lambda result: spec.load(result["lora"]),
    )


def _adapters(ctx: RunContext) -> Adapters:
    """LoRA adapters of every ``ple.lora_targets`` kernel (paper: r = 8, α = 16, all linear)."""
    p = ctx.config.ple
    return stages.lora_adapters(ctx, p.lora_rank, p.lora_alpha, p.lora_targets)


def _queries(p, prompts: list[dict], t: int) -> list[dict]:
    """Iteration ``t``'s queries: the next ``ple.prompts_per_iteration`` (0: all), wrapping."""
    n = p.prompts_per_iteration or len(prompts)
    first = (t * n) % len(prompts)
    return [prompts[(first + k) % len(prompts)] for k in range(min(n, len(prompts)))]


def _reward_judge(ctx: RunContext) -> judging.ResponseScorer:
    """``ple.reward``: a rule judge by name, or a reward-model folder."""
    cfg = ctx.config
    return stages.load_judge(
        ctx,
        cfg.ple.reward,
        batch_size=cfg.ple.reward_batch_size,
        max_response_tokens=cfg.data.max_response_tokens,
    )


# ----------------------------------------------------------------------------- 0. SFT


def sft_stage(ctx: RunContext, spec: Adapters, out: pathlib.Path) -> tuple[dict, nnx.State]:
    """Algorithm 1's starting point: the adapters fine-tuned on D_sft (``ple.sft_data``)."""
    cfg = ctx.config
    pairs, read = read_preference_records(
        cfg.ple.sft_data, cfg.data.on_bad_record, layout=cfg.ple.sft_layout
    )
    ctx.log(read.summary())
    if not pairs:
        raise ValueError(f"{cfg.ple.sft_data}: no SFT records (ple.sft_data)")
    batches, build = enhancement.build_ple_batches(
        [],
        enhancement.sft_records(pairs),
        ctx.tokenizer,
        batch_size=cfg.train.batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
        use_chat_template=cfg.data.use_chat_template,
    )
    if not batches:
        raise ValueError(f"{cfg.ple.sft_data}: no SFT record could be tokenised")
    adapters, report = train_adapters(
        ctx,
        spec,
        spec.init,
        batches,
        epochs=cfg.ple.sft_epochs,
        tag="sft/train",
        desc="SFT on D_sft",
        checkpoint_dir=out / "sft_checkpoints",  # round_0/checkpoints is iteration 0's
    )
    path = out / "sft_lora"  # round_0/lora is iteration 0's
    checkpoint.save_params(path, adapters)
    return {"lora": str(path), "read": read.read, "kept": read.kept, **build, **report}, adapters


# ----------------------------------------------------------------------------- 1. sample


def sample_candidates(
    ctx: RunContext, t: int, policy: nnx.State, prompts: list[dict]
) -> list[dict]:
    """A plain response ``y ~ π(·|x)`` and a principle-guided one ``y_p ~ π(·|x ⊕ p)`` per
    query: each prompt record with ``response``, ``principle_response`` and their ``_eos``."""
    cfg = ctx.config
    plain = [r["prompt"] for r in prompts]
    guided = [
        enhancement.principled_prompt(x, cfg.ple.principles, cfg.ple.principle_placement)
        for x in plain
    ]
    completions = sample_texts(
        ctx.model(policy),
        ctx.tokenizer,
        plain + guided,
        stages.sampling_config(ctx, n=1),
        seed=cfg.run.seed * 1000 + t,
        batch_size=cfg.run.generate_batch_size,
        mesh=ctx.mesh,
        progress=ctx.progress,
    )
    n = len(prompts)
    return [
        {
            **rec,
            "response": y.text,
            "response_eos": y.finished,
            "principle_response": yp.text,
            "principle_response_eos": yp.finished,
        }
        for rec, (y,), (yp,) in zip(prompts, completions[:n], completions[n:], strict=True)
    ]


def sample_stage(
    ctx: RunContext, t: int, policy: nnx.State, prompts: list[dict], out: pathlib.Path
) -> dict:
    """Writes :func:`sample_candidates` to ``candidates.jsonl``."""
    records = sample_candidates(ctx, t, policy, prompts)
    path = out / "candidates.jsonl"
    atomic_write_jsonl(path, records)
    return {
        "candidates": str(path),
        "prompts": len(records),
        "unfinished_plain": sum(not r["response_eos"] for r in records),
        "unfinished_principle": sum(not r["principle_response_eos"] for r in records),
    }


# ----------------------------------------------------------------------------- 2. score and route


def score_stage(
    ctx: RunContext,
    t: int,
    judge: judging.ResponseScorer,
    candidates_path: str,
    out: pathlib.Path,
) -> dict:
    """Rewards of both responses, normalised, and each pair routed by its gap against τ_t:
    writes ``scored.jsonl`` (every pair), ``ranking.jsonl`` and ``sft.jsonl``."""
    p = ctx.config.ple
    records = read_jsonl(candidates_path)
    prompts = [r["prompt"] for r in records]  # rewards are for answers to the plain x
    raw = np.stack(
        [
            judge(
                prompts,
                [r[key] for r in records],
                records,
                finished=[r[f"{key}_eos"] for r in records],
            )
            for key in ("response", "principle_response")
        ],
        axis=1,
    ).astype(np.float64)
    norm = enhancement.normalise_rewards(raw, p.reward_normalisation, p.reward_range)
    tau = enhancement.threshold(t, p.tau0, p.decay)
    ranking, sft, counts = enhancement.route_pairs(
        records, norm, tau, direction=p.ranking_direction, weighting=p.sft_weighting
    )
    routed = {r["id"]: "ranking" for r in ranking} | {r["id"]: "sft" for r in sft}
    scored = [
        {
            "id": r["id"],
            "reward": raw[i, 0],
            "principle_reward": raw[i, 1],
            "normalised": norm[i, 0],
            "principle_normalised": norm[i, 1],
            "gap": norm[i, 1] - norm[i, 0],
            "route": routed.get(r["id"], "skipped"),
        }
        for i, r in enumerate(records)
    ]
    atomic_write_jsonl(out / "scored.jsonl", scored)
    atomic_write_jsonl(out / "ranking.jsonl", ranking)
    atomic_write_jsonl(out / "sft.jsonl", sft)
    considered = max(counts.considered, 1)
    return {
        "ranking": str(out / "ranking.jsonl"),
        "sft": str(out / "sft.jsonl"),
        "tau": tau,
        **{f"count/{k}": v for k, v in dataclasses.asdict(counts).items()},
        "ranking_fraction": counts.ranking / considered,
        "sft_fraction": counts.sft / considered,
        "reward_mean_plain": float(raw[:, 0].mean()) if len(raw) else None,
        "reward_mean_principle": float(raw[:, 1].mean()) if len(raw) else None,
        "reward_std": float(raw.std()) if len(raw) else None,
        "gap_mean": float((norm[:, 1] - norm[:, 0]).mean()) if len(raw) else None,
        "gap_abs_mean": float(np.abs(norm[:, 1] - norm[:, 0]).mean()) if len(raw) else None,
    }


# ----------------------------------------------------------------------------- 3. train


def train_stage(
    ctx: RunContext,
    spec: Adapters,
    t: int,
    adapters: nnx.State,
    scored: dict,
    out: pathlib.Path,
) -> tuple[dict, nnx.State]:
    """The adapters after ``ple.epochs`` on the routed pairs (``L = L_rank + c·L_sft``),
    from ``adapters``; saves them to ``lora/`` and returns the stage's result and them."""
    cfg = ctx.config
    ranking, sft = read_jsonl(scored["ranking"]), read_jsonl(scored["sft"])
    batches, build = enhancement.build_ple_batches(
        ranking,
        sft,
        ctx.tokenizer,
        batch_size=cfg.train.batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
        use_chat_template=cfg.data.use_chat_template,
    )
    if batches:
        adapters, report = train_adapters(
            ctx,
            spec,
            adapters,
            batches,
            epochs=cfg.ple.epochs,
            tag=f"round_{t}/train",
            desc=f"iteration {t} train",
            checkpoint_dir=out / "checkpoints",
        )
    else:
        # Every pair was skipped or weighted 0 (e.g. all rewards at the bottom of the range
        # with sft_weighting=reward): the adapters carry over unchanged.
        ctx.log(
            f"iteration {t}: nothing to train on ({scored.get('count/considered')} pairs, "
            "all skipped or with weight 0); the model carries over unchanged"
        )
        report = {"steps": 0, "skipped_steps": 0}
    path = out / "lora"
    checkpoint.save_params(path, adapters)
    return {"lora": str(path), **build, **report}, adapters


def train_adapters(
    ctx: RunContext,
    spec: Adapters,
    adapters: nnx.State,
    batches: list[dict],
    *,
    epochs: int,
    tag: str,
    desc: str,
    checkpoint_dir: pathlib.Path,
) -> tuple[nnx.State, dict]:
    """Trains LoRA ``adapters`` on PLE batches with :func:`jaxalign.loop.train`; the base
    stays frozen (it rides along as the step's ``frozen`` argument).

    Batch order: one ``numpy`` stream seeded with ``train.seed``
    (:func:`jaxalign.loop.stream_order`). With ``run.checkpoint_every``, the train state
    is checkpointed in ``checkpoint_dir`` and a killed stage resumes mid-way. Returns the
    new adapter parameters and ``{steps, skipped_steps, final/..., mean/...}``.
    """
    cfg = ctx.config
    state_cfg, loss_fn, base_params = stages.lora_training(
        ctx.model(ctx.init_params),
        cfg.train,
        enhancement.ple_loss_fn(cfg.train, cfg.ple.sft_coefficient),
        spec.scaling,
    )
    result = loop.train(
        nnx.merge(spec.graphdef, adapters),
        batches,
        state_cfg,
        ctx.mesh,
        loss_fn=loss_fn,
        epochs=epochs,
        frozen=base_params,
        metrics=ctx.metrics,
        tag=tag,
        progress=ctx.progress,
        desc=desc,
        order=loop.stream_order(cfg.train.seed, len(batches)),
        checkpoint_dir=checkpoint_dir if cfg.run.checkpoint_every else None,
        save_every=cfg.run.checkpoint_every,
        log=ctx.log,
    )
    return result.params, result.summary()


# ----------------------------------------------------------------------------- the summary


def _iteration_row(runner: RoundRunner, t: int) -> dict:
    row: dict[str, Any] = {"iteration": t}
    if runner.done(t, "score"):
        sc = runner.result(t, "score")
        ranked = sc.get("count/ranking") or 0
        row.update(
            tau=sc["tau"],
            pairs=sc.get("count/considered"),
            ranking_fraction=sc["ranking_fraction"],
            sft_fraction=sc["sft_fraction"],
            principle_better=(sc.get("count/principle_better", 0) / ranked) if ranked else None,
            reward_plain=sc["reward_mean_plain"],
            reward_principle=sc["reward_mean_principle"],
        )
    if runner.done(t, "train"):
        row["train_loss"] = runner.result(t, "train").get("mean/train/loss")
    if runner.done(t, "eval"):
        row.update(stages.eval_columns(runner.result(t, "eval")))
    return row
