"""SPA: Spread Preference Annotation (Kim et al., arXiv 2406.04412).

Round 0 trains ``π_0`` by DPO on a small set of human-labelled seed pairs
(reference ``π_init``, 3 epochs). Each round ``i ≥ 1`` then

1. **samples** two responses per new prompt from ``π_{i-1}`` (temperature 0.7,
   top-p 1.0, up to 300 new tokens);
2. **judges** them with the model's own implicit reward against ``π_init``,
   ``r(x,y) = β·(log π_{i-1}(y|x) − log π_init(y|x))``, recomputed by a forward
   pass; the higher-reward response is ``chosen`` and the pair keeps its margin
   and ``p = σ(r_c − r_r)``;
3. **trains** ``π_i`` from ``π_{i-1}`` (reference ``π_{i-1}``, 1 epoch) with DPO
   plus self-refinement (:mod:`jaxalign.refinement`);
4. **evaluates** ``π_i`` against ``π_init`` with a gold judge, when configured.

Every stage runs under :class:`jaxalign.algorithms.rounds.RoundRunner`, so a
killed run resumes at the stage it was in. Artifacts per round:
``candidates.jsonl``, ``pairs.jsonl`` (with margins and ``p``), ``model/``
(parameters), ``eval.jsonl``; run-wide ``metrics.jsonl``, ``summary.json`` and
``summary.md``.

Multi-process runs (a TPU pod slice, several GPU hosts) run the same stages on
every process: sampling and training use global arrays on the mesh, with each
process feeding its own rows of every batch; every process holds the same
prompts, pairs and parameters, so all reach the same judgements; only process
0 logs and writes files (see :mod:`jaxalign.algorithms.rounds`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import checkpoint, judging, refinement, training
from jaxalign.algorithms import dpo
from jaxalign.algorithms.rounds import RoundRunner, atomic_write_jsonl, finish_run, read_jsonl
from jaxalign.config import Config, to_dict
from jaxalign.data.records import read_preference_records, read_prompt_records
from jaxalign.evaluation import score_answers, win_rate
from jaxalign.generation import sample_texts
from jaxalign.models import reward
from jaxalign.report import SUMMARY_COLUMNS, MetricsWriter, format_table, write_report


@dataclasses.dataclass
class Session:
    """What the stages of one run share in memory: model pieces, data, writers."""

    config: Config
    runner: RoundRunner
    graphdef: nnx.GraphDef
    init_params: nnx.State
    tokenizer: Any
    mesh: Any
    metrics: MetricsWriter
    log: Callable[[str], None]
    policy_params: nnx.State | None = None  # π_{i-1}; loaded from disk after a resume
    progress: bool = True  # progress bars (process 0 of a multi-process run only)
    eval_judge: Any = None  # eval.judge, loaded once (see eval_setup)
    baseline_params: nnx.State | None = None  # what eval compares against; None: init_params

    def model(self, params: nnx.State):
        return nnx.merge(self.graphdef, params)

    def load_round_params(self, round_index: int) -> nnx.State:
        path = self.runner.result(round_index, "train")["model"]
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.init_params)
        return checkpoint.load_params(path, abstract)


def sampling_config_for(config: Config, tokenizer, **changes):
    return config.sampling.replace(
        eos_token_ids=tuple(tokenizer.eos_token_ids),
        pad_token_id=tokenizer.pad_token_id,
        **changes,
    )


# ----------------------------------------------------------------------------- stages


def _train_stage(s: Session, round_index: int, records: list[dict], out: pathlib.Path) -> dict:
    cfg = s.config
    spa = cfg.spa
    seed_round = round_index == 0
    policy_params = s.init_params if seed_round else s.policy_params
    epochs = spa.seed_epochs if seed_round else spa.round_epochs
    batches, build_report = dpo.pair_batches(records, s.tokenizer, cfg)
    if not batches:
        raise ValueError(f"round {round_index}: no usable preference pairs to train on")
    if seed_round or not spa.refine:
        # Plain DPO; reference log-probs precomputed once, so training holds one model.
        batches = dpo.with_reference_logps(
            s.graphdef, policy_params, batches, cfg.train, mesh=s.mesh
        )
        loss_fn = training.dpo_loss_fn(cfg.train)
        frozen, algo_state, flag_after = None, None, None
    else:
        total_steps = epochs * len(batches)
        flag_after = int(spa.flag_warmup_ratio * total_steps)
        loss_fn = refinement.spa_loss_fn(
            s.graphdef,
            beta=cfg.train.beta,
            lam=spa.lambda_for_round(round_index),
            quantile=spa.noise_quantile,
            alpha=spa.smoothing_alpha,
            flag_after_step=flag_after,
            label_mode=spa.label_mode,
            chunk_size=cfg.train.logp_chunk_size,
        )
        frozen = policy_params  # reference π_{i-1}, run on the fly
        algo_state = refinement.init_margin_buffer(spa.margin_buffer_batches * cfg.train.batch_size)
    result = dpo.train(
        s.model(policy_params),
        batches,
        cfg.train,
        s.mesh,
        loss_fn=loss_fn,
        epochs=epochs,
        frozen=frozen,
        algo_state=algo_state,
        metrics=s.metrics,
        tag=f"round_{round_index}/train",
        progress=s.progress,
        desc=f"round {round_index} train",
        seed=cfg.train.seed + round_index,
        checkpoint_dir=(out / "checkpoints") if cfg.run.checkpoint_every else None,
        save_every=cfg.run.checkpoint_every,
        log=s.log,
    )
    s.policy_params = result.params
    model_dir = out / "model"
    saved = time.perf_counter()
    checkpoint.save_params(model_dir, result.params)
    checkpoint_seconds = time.perf_counter() - saved
    summary = {
        "model": str(model_dir),
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
    return summary


def _sample_stage(s: Session, round_index: int, prompts: list[dict], out: pathlib.Path) -> dict:
    cfg = s.config
    sampling = sampling_config_for(cfg, s.tokenizer, n=cfg.spa.samples_per_prompt)
    completions = sample_texts(
        s.model(s.policy_params),
        s.tokenizer,
        [r["prompt"] for r in prompts],
        sampling,
        seed=cfg.run.seed * 1000 + round_index,
        batch_size=cfg.run.generate_batch_size,
        mesh=s.mesh,
        progress=s.progress,
    )
    records = []
    for rec, comps in zip(prompts, completions, strict=True):
        records.append(
            {
                **rec,
                "responses": [
                    {
                        "text": c.text,
                        "finished": c.finished,
                        "truncated": c.truncated,
                        "num_tokens": len(c.token_ids),
                    }
                    for c in comps
                ],
            }
        )
    path = out / "candidates.jsonl"
    atomic_write_jsonl(path, records)
    n_resp = sum(len(r["responses"]) for r in records)
    return {
        "candidates": str(path),
        "prompts": len(records),
        "responses": n_resp,
        "truncated_responses": sum(x["truncated"] for r in records for x in r["responses"]),
    }


def _judge_stage(s: Session, round_index: int, candidates_path: str, out: pathlib.Path) -> dict:
    cfg = s.config
    records = read_jsonl(candidates_path)
    # Score each prompt's first two candidates as an (a, b) "pair" under both models.
    pair_records = [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "chosen": r["responses"][0]["text"],
            "rejected": r["responses"][1]["text"],
            "chosen_eos": r["responses"][0]["finished"],
            "rejected_eos": r["responses"][1]["finished"],
        }
        for r in records
    ]

    def logps(params):
        return dpo.response_logps(s.graphdef, params, pair_records, s.tokenizer, cfg, s.mesh)

    logp_policy, logp_init = logps(s.policy_params), logps(s.init_params)
    counts = None
    if cfg.spa.judge_length_normalize:
        counts = dpo.response_token_counts(pair_records, s.tokenizer, cfg)
    rewards = judging.implicit_reward(logp_policy, logp_init, cfg.train.beta, counts)  # [N, 2]
    candidates = [
        [judging.Candidate(x["text"], x["finished"], x["num_tokens"]) for x in r["responses"][:2]]
        for r in records
    ]
    pairs, counts = judging.make_pairs(
        [r["id"] for r in records],
        [r["prompt"] for r in records],
        candidates,
        rewards.tolist(),
        truncated_policy=cfg.spa.truncated_policy,
    )
    answers = {r["id"]: r["answer"] for r in records if "answer" in r}
    out_records = [
        pair.to_record() | ({"answer": answers[pair.id]} if pair.id in answers else {})
        for pair in pairs
    ]
    path = out / "pairs.jsonl"
    atomic_write_jsonl(path, out_records)
    result = {
        "pairs": str(path),
        **{f"count/{k}": v for k, v in dataclasses.asdict(counts).items()},
        "margin_mean": float(np.mean([p.margin for p in pairs])) if pairs else None,
        "p_mean": float(np.mean([p.p for p in pairs])) if pairs else None,
    }
    if out_records and all("answer" in r for r in out_records) and cfg.eval.judge:
        gold = judging.get_rule_judge(cfg.eval.judge)
        g_c = gold(
            [r["prompt"] for r in out_records],
            [r["chosen"] for r in out_records],
            out_records,
            finished=[r["chosen_eos"] for r in out_records],
        )
        g_r = gold(
            [r["prompt"] for r in out_records],
            [r["rejected"] for r in out_records],
            out_records,
            finished=[r["rejected_eos"] for r in out_records],
        )
        agreement, separated = judging.gold_agreement(g_c, g_r)
        result["gold_agreement"] = agreement
        result["gold_separated"] = separated
    return result


def _greedy_answers(s: Session, params, prompts: list[dict]) -> list[judging.Candidate]:
    cfg = s.config
    sampling = sampling_config_for(
        cfg, s.tokenizer, n=1, greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens
    )
    comps = sample_texts(
        s.model(params),
        s.tokenizer,
        [r["prompt"] for r in prompts],
        sampling,
        seed=cfg.run.seed,
        batch_size=cfg.run.generate_batch_size,
        mesh=s.mesh,
        progress=s.progress,
    )
    return [judging.Candidate(c[0].text, c[0].finished, len(c[0].token_ids)) for c in comps]


def eval_setup(s: Session) -> list[dict]:
    """The eval prompts (``data.eval_prompts``, first ``eval.max_prompts``), with the gold
    judge (``eval.judge``: a rule judge or a reward-model folder) loaded into ``s.eval_judge``
    now, so a bad judge fails before any training. Shared by SPA and PLE."""
    cfg = s.config
    if not cfg.eval.enabled:
        return []
    prompts, report = read_prompt_records(
        cfg.data.eval_prompts, cfg.data.on_bad_record, kind="eval"
    )
    s.log(report.summary())
    if s.eval_judge is None:
        s.eval_judge = reward.load_reward_judge(
            cfg.eval.judge,
            tokenizer=s.tokenizer,
            batch_size=cfg.run.generate_batch_size,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.eval.max_new_tokens,
            use_chat_template=cfg.data.use_chat_template,
        )
    return prompts[: cfg.eval.max_prompts]


def eval_stage(s: Session, round_index: int, prompts: list[dict], out: pathlib.Path) -> dict:
    """Greedy answers of the current policy vs the baseline's (``s.baseline_params``, by
    default the starting model; its answers are cached in ``baseline_eval.jsonl``), both
    scored by the gold judge."""
    if s.eval_judge is None:
        eval_setup(s)
    baseline_path = s.runner.run_dir / "baseline_eval.jsonl"
    if baseline_path.exists():
        baseline = [judging.Candidate(**r["response"]) for r in read_jsonl(baseline_path)]
    else:
        base_params = s.init_params if s.baseline_params is None else s.baseline_params
        baseline = _greedy_answers(s, base_params, prompts)
        atomic_write_jsonl(
            baseline_path,
            [
                {"id": p["id"], "response": dataclasses.asdict(c)}
                for p, c in zip(prompts, baseline, strict=True)
            ],
        )
    answers = _greedy_answers(s, s.policy_params, prompts)
    ours = score_answers(s.eval_judge, prompts, answers)
    base = score_answers(s.eval_judge, prompts, baseline)
    wr = win_rate(ours, base)
    atomic_write_jsonl(
        out / "eval.jsonl",
        [
            {
                "id": p["id"],
                "prompt": p["prompt"],
                "response": a.text,
                "finished": a.finished,
                "score": float(x),
                "baseline": b.text,
                "baseline_score": float(y),
            }
            for p, a, b, x, y in zip(prompts, answers, baseline, ours, base, strict=True)
        ],
    )
    words = [len(a.text.split()) for a in answers]
    return {
        "eval": str(out / "eval.jsonl"),
        "win_rate": wr.rate,
        "win_ci": [wr.ci_low, wr.ci_high],
        "wins": wr.wins,
        "ties": wr.ties,
        "losses": wr.losses,
        "gold_score": float(np.mean(ours)),
        "baseline_gold_score": float(np.mean(base)),
        "mean_words": float(np.mean(words)),
        "baseline_mean_words": float(np.mean([len(b.text.split()) for b in baseline])),
    }


# ----------------------------------------------------------------------------- the run


def _run_round(s: Session, i: int, prompts: list[dict], eval_prompts: list[dict]) -> None:
    """Round ``i ≥ 1``: sample → judge → train → eval, each stage at most once."""
    runner = s.runner
    if runner.done(i, "train"):
        s.policy_params = s.load_round_params(i)
    else:
        if s.policy_params is None:
            s.policy_params = s.load_round_params(i - 1)
        sampled = runner.stage(i, "sample", lambda d: _sample_stage(s, i, prompts, d))
        judged = runner.stage(i, "judge", lambda d: _judge_stage(s, i, sampled["candidates"], d))
        pairs = read_jsonl(judged["pairs"])
        runner.stage(i, "train", lambda d: _train_stage(s, i, pairs, d))
    if s.config.eval.enabled:
        runner.stage(i, "eval", lambda d: eval_stage(s, i, eval_prompts, d))


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
        e = runner.result(i, "eval")
        row.update(
            win_rate=e["win_rate"],
            win_ci=f"{e['win_ci'][0]:.2f}-{e['win_ci'][1]:.2f}",
            gold_score=e["gold_score"],
            mean_words=e["mean_words"],
        )
    return row


def run(config: Config, *, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) SPA as configured; returns the round summary."""
    from jaxalign.models import load
    from jaxalign.parallel import is_primary_process, make_mesh

    start = time.perf_counter()
    cfg = config
    primary = is_primary_process()
    if not primary:
        log = lambda message: None  # noqa: E731 -- only process 0 logs
    runner = RoundRunner(cfg.run.output_dir, to_dict(cfg), log=log)
    mesh_cfg = cfg.run.mesh
    mesh = make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    log(f"loading {cfg.model.name}")
    model, tokenizer = load(
        cfg.model.name,
        param_dtype=cfg.model.param_dtype,
        dtype=cfg.model.dtype,
        cache_dir=cfg.model.cache_dir,
    )
    graphdef, init_params = nnx.split(model)
    s = Session(
        config=cfg,
        runner=runner,
        graphdef=graphdef,
        init_params=init_params,
        tokenizer=tokenizer,
        mesh=mesh,
        metrics=MetricsWriter(runner.run_dir / "metrics.jsonl"),
        log=log,
        progress=cfg.run.progress and primary,
    )
    seed_pairs, seed_report = read_preference_records(cfg.data.seed_pairs, cfg.data.on_bad_record)
    prompts, prompt_report = read_prompt_records(cfg.data.prompts, cfg.data.on_bad_record)
    log(seed_report.summary())
    log(prompt_report.summary())
    eval_prompts = eval_setup(s)

    # Round 0: DPO on the seed pairs.
    runner.stage(0, "train", lambda d: _train_stage(s, 0, seed_pairs, d))
    if s.policy_params is None:
        s.policy_params = s.load_round_params(0)
    if cfg.eval.enabled:
        runner.stage(0, "eval", lambda d: eval_stage(s, 0, eval_prompts, d))

    cursor = 0
    for i in range(1, cfg.spa.rounds + 1):
        want = cfg.spa.prompts_for_round(i)
        round_prompts = prompts[cursor : cursor + want]
        cursor += want
        if not round_prompts:
            log(f"round {i}: no unused prompts left ({len(prompts)} in all); stopping")
            break
        if len(round_prompts) < want:
            log(f"round {i}: only {len(round_prompts)} of {want} prompts left; using them")
        _run_round(s, i, round_prompts, eval_prompts)

    rows = [_round_row(runner, i) for i in range(0, cfg.spa.rounds + 1) if runner.done(i, "train")]
    if cfg.eval.enabled and runner.done(0, "eval"):
        base = runner.result(0, "eval")
        rows.insert(
            0,
            {
                "round": "SFT",
                "gold_score": base["baseline_gold_score"],
                "mean_words": base["baseline_mean_words"],
                "win_rate": 0.5,
            },
        )
    table = format_table(rows, SUMMARY_COLUMNS)
    seconds = time.perf_counter() - start
    summary = finish_run(
        runner, rows, table, title="SPA run summary", rows_key="rounds", seconds=seconds
    )
    s.metrics.close()
    if isinstance(runner.run_dir, pathlib.Path):
        log(f"\nreport: {write_report(runner.run_dir)}")
    else:  # the HTML report reads local files: `jaxalign report` on a copy of the run
        log(f"\nreport: copy {runner.run_dir} to a local folder and run `jaxalign report` on it")
    log(f"run directory: {runner.run_dir}  ({seconds:.0f}s this invocation)")
    return summary
