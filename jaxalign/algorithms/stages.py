"""What SPA's and PLE's runs share: the run's context, the evaluation stage, and reading back.

A *stage* is a function of its inputs — the :class:`RunContext`, the parameters it
starts from, records or artifact paths — that writes its artifacts into the round's
folder and returns a JSON-able result for ``state.json``; a stage that makes
parameters returns them as well (:meth:`jaxalign.algorithms.rounds.RoundRunner.produce`).
Nothing is handed from stage to stage except through those return values.

- :func:`start_run` opens (or reopens) the run directory, builds the mesh and loads
  the model: the first lines of every run;
- :func:`eval_setup` and :func:`eval_stage` are the end-of-round evaluation: greedy
  answers of the current model and of a baseline (by default the starting model),
  both scored by the gold judge (``eval.judge``), and the win rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import checkpoint, judging, parallel
from jaxalign.algorithms.rounds import RoundRunner, RunPath, atomic_write_jsonl, read_jsonl
from jaxalign.config import Config, to_dict
from jaxalign.data.records import read_prompt_records
from jaxalign.evaluation import score_answers, win_rate
from jaxalign.generation import sample_texts
from jaxalign.loading import load
from jaxalign.report import MetricsWriter
from jaxalign.reward_judge import load_reward_judge
from jaxalign.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of a run reads and none changes."""

    config: Config
    run_dir: RunPath
    tokenizer: Any
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef  # the policy's Transformer
    init_params: nnx.State  # the loaded model: π_init, SPA's judge reference, PLE's base
    metrics: MetricsWriter
    log: Callable[[str], None]
    progress: bool  # progress bars (process 0 of a multi-process run only)

    def model(self, params: nnx.State):
        """The Transformer with ``params``."""
        return nnx.merge(self.graphdef, params)


def start_run(config: Config, log: Callable[[str], None]) -> tuple[RunContext, RoundRunner]:
    """The run directory (resumed when it holds this config's run), mesh and model.

    In a multi-process run only process 0 logs and shows progress bars.
    """
    primary = parallel.is_primary_process()
    if not primary:
        log = lambda message: None  # noqa: E731 -- only process 0 logs
    runner = RoundRunner(config.run.output_dir, to_dict(config), log=log)
    mesh = parallel.make_mesh(config.run.mesh.data, config.run.mesh.fsdp, config.run.mesh.tensor)
    log(parallel.describe_devices(mesh))
    log(f"loading {config.model.name}")
    model, tokenizer = load(
        config.model.name,
        param_dtype=config.model.param_dtype,
        dtype=config.model.dtype,
        cache_dir=config.model.cache_dir,
    )
    graphdef, init_params = nnx.split(model)
    context = RunContext(
        config=config,
        run_dir=runner.run_dir,
        tokenizer=tokenizer,
        mesh=mesh,
        graphdef=graphdef,
        init_params=init_params,
        metrics=MetricsWriter(runner.run_dir / "metrics.jsonl"),
        log=log,
        progress=config.run.progress and primary,
    )
    return context, runner


def load_params(path: str, like: nnx.State) -> nnx.State:
    """Parameters a finished stage saved at ``path``, in the structure and dtypes of ``like``."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return checkpoint.load_params(path, abstract)


def sampling_config(ctx: RunContext, **changes) -> SamplingConfig:
    """``config.sampling`` with the tokenizer's stop and pad ids, and ``changes``."""
    return ctx.config.sampling.replace(
        eos_token_ids=tuple(ctx.tokenizer.eos_token_ids),
        pad_token_id=ctx.tokenizer.pad_token_id,
        **changes,
    )


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The eval prompts and the gold judge that scores answers to them."""

    prompts: list[dict]
    judge: judging.ResponseScorer | None


def eval_setup(ctx: RunContext, judge: judging.ResponseScorer | None = None) -> Evaluation:
    """The eval prompts (``data.eval_prompts``, first ``eval.max_prompts``) and the gold judge
    (``eval.judge``: a rule judge or a reward-model folder), loaded now so that a bad judge
    fails before any training; ``judge``: one already loaded (PLE's reward, when it is the
    same)."""
    cfg = ctx.config
    if not cfg.eval.enabled:
        return Evaluation([], None)
    prompts, report = read_prompt_records(
        cfg.data.eval_prompts, cfg.data.on_bad_record, kind="eval"
    )
    ctx.log(report.summary())
    if judge is None:
        judge = load_reward_judge(
            cfg.eval.judge,
            tokenizer=ctx.tokenizer,
            batch_size=cfg.run.generate_batch_size,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.eval.max_new_tokens,
            use_chat_template=cfg.data.use_chat_template,
        )
    return Evaluation(prompts[: cfg.eval.max_prompts], judge)


def greedy_answers(ctx: RunContext, params: nnx.State, prompts: list[dict]) -> list:
    """One answer per prompt from the model with ``params`` (greedy unless ``eval.greedy``
    is off), as :class:`jaxalign.judging.Candidate`."""
    cfg = ctx.config
    sampling = sampling_config(
        ctx, n=1, greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens
    )
    comps = sample_texts(
        ctx.model(params),
        ctx.tokenizer,
        [r["prompt"] for r in prompts],
        sampling,
        seed=cfg.run.seed,
        batch_size=cfg.run.generate_batch_size,
        mesh=ctx.mesh,
        progress=ctx.progress,
    )
    return [judging.Candidate(c[0].text, c[0].finished, len(c[0].token_ids)) for c in comps]


def eval_stage(
    ctx: RunContext,
    evaluation: Evaluation,
    params: nnx.State,
    baseline_params: nnx.State,
    out: RunPath,
) -> dict:
    """Greedy answers of the model with ``params`` against the baseline's, both scored by the
    gold judge; writes ``eval.jsonl`` and returns the win rate and scores.

    The baseline's answers are the same in every round: they are computed once and
    cached in the run's ``baseline_eval.jsonl``.
    """
    prompts = evaluation.prompts
    baseline_path = ctx.run_dir / "baseline_eval.jsonl"
    if baseline_path.exists():
        baseline = [judging.Candidate(**r["response"]) for r in read_jsonl(baseline_path)]
    else:
        baseline = greedy_answers(ctx, baseline_params, prompts)
        atomic_write_jsonl(
            baseline_path,
            [
                {"id": p["id"], "response": dataclasses.asdict(c)}
                for p, c in zip(prompts, baseline, strict=True)
            ],
        )
    answers = greedy_answers(ctx, params, prompts)
    ours = score_answers(evaluation.judge, prompts, answers)
    base = score_answers(evaluation.judge, prompts, baseline)
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


# ----------------------------------------------------------------------------- summary rows


def eval_columns(result: dict) -> dict:
    """A summary row's evaluation columns, from an eval stage's result."""
    return {
        "win_rate": result["win_rate"],
        "win_ci": f"{result['win_ci'][0]:.2f}-{result['win_ci'][1]:.2f}",
        "gold_score": result["gold_score"],
        "mean_words": result["mean_words"],
    }


def baseline_row(runner: RoundRunner, key: str, label: str) -> list[dict]:
    """The summary's first row, the baseline's scores (``[]`` before the first evaluation):
    ``{key: label, gold_score, mean_words, win_rate: 0.5}``."""
    if not runner.done(0, "eval"):
        return []
    first = runner.result(0, "eval")
    return [
        {
            key: label,
            "gold_score": first["baseline_gold_score"],
            "mean_words": first["baseline_mean_words"],
            "win_rate": 0.5,
        }
    ]
