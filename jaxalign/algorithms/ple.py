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

Artifacts per iteration ``round_t``: ``candidates.jsonl`` (both responses),
``scored.jsonl`` (rewards, gap, route), ``lora/`` (adapter parameters),
``eval.jsonl``; run-wide ``metrics.jsonl``, ``summary.json``, ``summary.md`` and
``model_hf/`` (the merged model as a Hugging Face folder).
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

from jaxalign import checkpoint, enhancement, loop, training
from jaxalign.algorithms import spa
from jaxalign.algorithms.rounds import (
    RoundRunner,
    atomic_directory,
    atomic_write_jsonl,
    finish_run,
    read_jsonl,
)
from jaxalign.config import to_dict
from jaxalign.data.records import read_preference_records, read_prompt_records
from jaxalign.generation import sample_texts
from jaxalign.models import lora, reward
from jaxalign.report import MetricsWriter, format_table

SUMMARY_COLUMNS = [
    ("iteration", "iteration"),
    ("tau", "τ_t"),
    ("pairs", "pairs"),
    ("ranking_fraction", "→ ranking"),
    ("sft_fraction", "→ weighted SFT"),
    ("principle_better", "y_p better (ranked)"),
    ("reward_plain", "reward y"),
    ("reward_principle", "reward y_p"),
    ("train_loss", "train loss"),
    ("win_rate", "win rate vs start"),
    ("win_ci", "95% CI"),
    ("gold_score", "gold score"),
    ("mean_words", "words/response"),
]


@dataclasses.dataclass
class Session:
    """What PLE's stages share; attribute names match SPA's, so its eval stage works here."""

    config: Any
    runner: RoundRunner
    graphdef: nnx.GraphDef  # the base Transformer's
    init_params: nnx.State  # the frozen base (the starting model and the reference)
    tokenizer: Any
    mesh: Any
    metrics: MetricsWriter
    log: Callable[[str], None]
    adapters_graphdef: nnx.GraphDef
    adapters_init: nnx.State
    adapters: nnx.State | None = None  # after the last finished iteration
    policy_params: nnx.State | None = None  # base merged with ``adapters``
    judge: Any = None  # ple.reward, loaded on first use
    progress: bool = True  # progress bars (process 0 of a multi-process run only)
    eval_judge: Any = None  # eval.judge (the same object as ``judge`` when they name one judge)
    baseline_params: nnx.State | None = None  # eval's baseline: the SFT model, else None (base)

    @property
    def scaling(self) -> float:
        return lora.lora_scaling(self.config.ple.lora_rank, self.config.ple.lora_alpha)

    def model(self, params: nnx.State):
        return nnx.merge(self.graphdef, params)

    def merged(self, adapters: nnx.State) -> nnx.State:
        """The base parameters with ``adapters`` folded in."""
        return jax.device_get(
            jax.jit(lora.apply_lora, static_argnums=2)(self.init_params, adapters, self.scaling)
        )

    def set_adapters(self, adapters: nnx.State) -> None:
        self.adapters = adapters
        self.policy_params = self.merged(adapters)

    def load_adapters(self, iteration: int, stage: str = "train") -> nnx.State:
        path = self.runner.result(iteration, stage)["lora"]
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.adapters_init
        )
        return checkpoint.load_params(path, abstract)


def _sample_stage(s: Session, t: int, prompts: list[dict], out: pathlib.Path) -> dict:
    cfg = s.config
    sampling = spa.sampling_config_for(cfg, s.tokenizer, n=1)
    plain = [r["prompt"] for r in prompts]
    guided = [
        enhancement.principled_prompt(x, cfg.ple.principles, cfg.ple.principle_placement)
        for x in plain
    ]
    completions = sample_texts(
        s.model(s.policy_params),
        s.tokenizer,
        plain + guided,
        sampling,
        seed=cfg.run.seed * 1000 + t,
        batch_size=cfg.run.generate_batch_size,
        mesh=s.mesh,
        progress=s.progress,
    )
    n = len(prompts)
    records = []
    for rec, (y,), (yp,) in zip(prompts, completions[:n], completions[n:], strict=True):
        records.append(
            {
                **rec,
                "response": y.text,
                "response_eos": y.finished,
                "principle_response": yp.text,
                "principle_response_eos": yp.finished,
            }
        )
    path = out / "candidates.jsonl"
    atomic_write_jsonl(path, records)
    return {
        "candidates": str(path),
        "prompts": n,
        "unfinished_plain": sum(not r["response_eos"] for r in records),
        "unfinished_principle": sum(not r["principle_response_eos"] for r in records),
    }


def _reward_judge(s: Session):
    if s.judge is None:
        cfg = s.config
        s.judge = reward.load_reward_judge(
            cfg.ple.reward,
            tokenizer=s.tokenizer,
            batch_size=cfg.ple.reward_batch_size,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.data.max_response_tokens,
            use_chat_template=cfg.data.use_chat_template,
        )
    return s.judge


def _score_stage(s: Session, t: int, candidates_path: str, out: pathlib.Path) -> dict:
    p = s.config.ple
    records = read_jsonl(candidates_path)
    judge = _reward_judge(s)
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


def train_adapters(
    s: Session, batches: list[dict], *, epochs: int, tag: str, desc: str, checkpoint_dir
) -> tuple[nnx.State, dict]:
    """Trains the LoRA adapters (from ``s.adapters``) on PLE batches; the base stays frozen.

    Batch order: one ``numpy`` stream seeded with ``train.seed``
    (:func:`jaxalign.loop.stream_order`). With ``run.checkpoint_every``, the train state
    is checkpointed in ``checkpoint_dir`` and a killed stage resumes mid-way. Returns the
    new adapter parameters and ``{steps, skipped_steps, final/..., mean/...}``.
    """
    cfg = s.config
    # The adapters are the trained "model"; compute dtype and remat apply to the base.
    state_cfg = dataclasses.replace(cfg.train, compute_dtype=None, remat=None)
    base_model = training.configure_model(s.model(s.init_params), cfg.train)
    base_graphdef, base_params = nnx.split(base_model)
    loss_fn = lora.lora_loss_fn(
        base_graphdef, enhancement.ple_loss_fn(cfg.train, cfg.ple.sft_coefficient), s.scaling
    )
    result = loop.train(
        nnx.merge(s.adapters_graphdef, s.adapters),
        batches,
        state_cfg,
        s.mesh,
        loss_fn=loss_fn,
        epochs=epochs,
        frozen=base_params,
        metrics=s.metrics,
        tag=tag,
        progress=s.progress,
        desc=desc,
        order=loop.stream_order(cfg.train.seed, len(batches)),
        checkpoint_dir=checkpoint_dir if cfg.run.checkpoint_every else None,
        save_every=cfg.run.checkpoint_every,
        log=s.log,
    )
    return result.params, result.summary()


def _train_stage(s: Session, t: int, scored: dict, out: pathlib.Path) -> dict:
    cfg = s.config
    ranking, sft = read_jsonl(scored["ranking"]), read_jsonl(scored["sft"])
    batches, build = enhancement.build_ple_batches(
        ranking,
        sft,
        s.tokenizer,
        batch_size=cfg.train.batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
        use_chat_template=cfg.data.use_chat_template,
    )
    if batches:
        adapters, report = train_adapters(
            s,
            batches,
            epochs=cfg.ple.epochs,
            tag=f"round_{t}/train",
            desc=f"iteration {t} train",
            checkpoint_dir=out / "checkpoints",
        )
    else:
        # Every pair was skipped or weighted 0 (e.g. all rewards at the bottom of the range
        # with sft_weighting=reward): the adapters carry over unchanged.
        s.log(
            f"iteration {t}: nothing to train on ({scored.get('count/considered')} pairs, "
            "all skipped or with weight 0); the model carries over unchanged"
        )
        adapters, report = s.adapters, {"steps": 0, "skipped_steps": 0}
    path = out / "lora"
    checkpoint.save_params(path, adapters)
    s.set_adapters(adapters)
    return {"lora": str(path), **build, **report}


def _sft_stage(s: Session, out: pathlib.Path) -> dict:
    """Algorithm 1's starting point: the adapters fine-tuned on D_sft (``ple.sft_data``)."""
    cfg = s.config
    pairs, read = read_preference_records(
        cfg.ple.sft_data, cfg.data.on_bad_record, layout=cfg.ple.sft_layout
    )
    s.log(read.summary())
    if not pairs:
        raise ValueError(f"{cfg.ple.sft_data}: no SFT records (ple.sft_data)")
    batches, build = enhancement.build_ple_batches(
        [],
        enhancement.sft_records(pairs),
        s.tokenizer,
        batch_size=cfg.train.batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
        use_chat_template=cfg.data.use_chat_template,
    )
    if not batches:
        raise ValueError(f"{cfg.ple.sft_data}: no SFT record could be tokenised")
    s.adapters = s.adapters_init
    adapters, report = train_adapters(
        s,
        batches,
        epochs=cfg.ple.sft_epochs,
        tag="sft/train",
        desc="SFT on D_sft",
        checkpoint_dir=out / "sft_checkpoints",  # round_0/checkpoints is iteration 0's
    )
    path = out / "sft_lora"  # round_0/lora is iteration 0's
    checkpoint.save_params(path, adapters)
    s.set_adapters(adapters)
    return {"lora": str(path), "read": read.read, "kept": read.kept, **build, **report}


def _start_adapters(s: Session) -> nnx.State:
    """The adapters PLE's first iteration starts from: after SFT when there is one."""
    return s.load_adapters(0, "sft") if s.runner.done(0, "sft") else s.adapters_init


def _export_stage(s: Session, out_dir: pathlib.Path) -> dict:
    base = s.model(s.init_params)
    adapters = nnx.merge(s.adapters_graphdef, s.adapters)
    with atomic_directory(out_dir) as tmp:
        lora.export_merged_hf(base, adapters, s.scaling, tmp, s.tokenizer)
    return {"model_hf": str(out_dir)}


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
        e = runner.result(t, "eval")
        row.update(
            win_rate=e["win_rate"],
            win_ci=f"{e['win_ci'][0]:.2f}-{e['win_ci'][1]:.2f}",
            gold_score=e["gold_score"],
            mean_words=e["mean_words"],
        )
    return row


def _run_iteration(s: Session, t: int, prompts: list[dict], eval_prompts: list[dict]) -> None:
    """Iteration ``t``: sample → score → train → eval, each stage at most once."""
    runner = s.runner
    if runner.done(t, "train"):
        s.set_adapters(s.load_adapters(t))
    else:
        if s.adapters is None:
            s.set_adapters(s.load_adapters(t - 1) if t > 0 else _start_adapters(s))
        sampled = runner.stage(t, "sample", lambda d: _sample_stage(s, t, prompts, d))
        scored = runner.stage(t, "score", lambda d: _score_stage(s, t, sampled["candidates"], d))
        runner.stage(t, "train", lambda d: _train_stage(s, t, scored, d))
    if s.config.eval.enabled:
        runner.stage(t, "eval", lambda d: spa.eval_stage(s, t, eval_prompts, d))


def run(config, *, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) PLE as configured; returns the iteration summary."""
    from jaxalign.models import load
    from jaxalign.parallel import is_primary_process, make_mesh

    start = time.perf_counter()
    cfg = config
    p = cfg.ple
    primary = is_primary_process()
    if not primary:
        log = lambda message: None  # noqa: E731 -- only process 0 logs
    runner = RoundRunner(cfg.run.output_dir, to_dict(cfg), log=log)
    mesh = make_mesh(cfg.run.mesh.data, cfg.run.mesh.fsdp, cfg.run.mesh.tensor)
    log(f"loading {cfg.model.name}")
    model, tokenizer = load(
        cfg.model.name,
        param_dtype=cfg.model.param_dtype,
        dtype=cfg.model.dtype,
        cache_dir=cfg.model.cache_dir,
    )
    graphdef, init_params = nnx.split(model)
    adapters = lora.LoraAdapters(
        model, rank=p.lora_rank, targets=p.lora_targets, rngs=nnx.Rngs(cfg.run.seed)
    )
    adapters_graphdef, adapters_init = nnx.split(adapters)
    s = Session(
        config=cfg,
        runner=runner,
        graphdef=graphdef,
        init_params=init_params,
        tokenizer=tokenizer,
        mesh=mesh,
        metrics=MetricsWriter(runner.run_dir / "metrics.jsonl"),
        log=log,
        adapters_graphdef=adapters_graphdef,
        adapters_init=adapters_init,
        progress=cfg.run.progress and primary,
    )
    prompts, prompt_report = read_prompt_records(cfg.data.prompts, cfg.data.on_bad_record)
    log(prompt_report.summary())
    if not prompts:
        raise ValueError(f"{cfg.data.prompts}: no prompts to generate from")
    if cfg.eval.enabled and cfg.eval.judge == p.reward:
        s.eval_judge = _reward_judge(s)  # one reward model in memory, not two
    eval_prompts = spa.eval_setup(s)

    if p.sft_data:
        runner.stage(0, "sft", lambda d: _sft_stage(s, d))
        # Eval compares against the SFT model, where PLE's iterations start.
        s.baseline_params = s.merged(_start_adapters(s))

    for t in range(p.iterations):
        n = p.prompts_per_iteration or len(prompts)
        first = (t * n) % len(prompts)
        chosen = [prompts[(first + k) % len(prompts)] for k in range(min(n, len(prompts)))]
        _run_iteration(s, t, chosen, eval_prompts)
    last = p.iterations - 1
    if p.export_hf and not runner.done(last, "export"):
        if s.adapters is None:
            s.set_adapters(s.load_adapters(last))
        runner.stage(last, "export", lambda d: _export_stage(s, runner.run_dir / "model_hf"))

    rows = [_iteration_row(runner, t) for t in range(p.iterations) if runner.done(t, "train")]
    if cfg.eval.enabled and runner.done(0, "eval"):
        base = runner.result(0, "eval")
        rows.insert(
            0,
            {
                "iteration": "start (SFT)" if p.sft_data else "start",
                "gold_score": base["baseline_gold_score"],
                "mean_words": base["baseline_mean_words"],
                "win_rate": 0.5,
            },
        )
    table = format_table(rows, SUMMARY_COLUMNS)
    seconds = time.perf_counter() - start
    summary = finish_run(
        runner, rows, table, title="PLE run summary", rows_key="iterations", seconds=seconds
    )
    s.metrics.close()
    log(f"\nrun directory: {runner.run_dir}  ({seconds:.0f}s this invocation)")
    return summary
