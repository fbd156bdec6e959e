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
  both scored by the gold judge (``eval.judge``), and the win rate;
- :func:`export_models` and :func:`export_stage` write the rounds ``run.export_hf``
  selects as Hugging Face folders (``round_K/model_hf``) with a model card
  (:func:`card_facts`, :mod:`jaxalign.model_card`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import checkpoint, judging, model_card, parallel, training
from jaxalign.algorithms.rounds import (
    RoundRunner,
    RunPath,
    atomic_directory,
    atomic_write_jsonl,
    read_jsonl,
    write_bytes,
)
from jaxalign.config import Config, to_dict
from jaxalign.data.records import read_prompt_records
from jaxalign.evaluation import score_answers, win_rate
from jaxalign.generation import sample_texts
from jaxalign.loading import compile_cache_dir, hub_id_of_path, load, provenance
from jaxalign.models import lora
from jaxalign.models.llama import Transformer
from jaxalign.report import MetricsWriter
from jaxalign.reward_judge import load_reward_judge
from jaxalign.sampling import SamplingConfig
from jaxalign.weights import export_hf


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
    if config.run.compile_cache:
        parallel.use_compile_cache(compile_cache_dir())
    runner = RoundRunner(
        config.run.output_dir, to_dict(config), log=log, defaults=to_dict(Config())
    )
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
    # On the devices for the whole run, as training shards it: every stage reads it
    # (π_init is the judge's reference, SPA's round-0 start and LoRA's frozen base).
    init_params = parallel.place_params(init_params, mesh)
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


@dataclasses.dataclass(frozen=True)
class Adapters:
    """LoRA adapters of the loaded model, as PLE and SPA with ``spa.lora_rank`` train them:
    their structure, start and scale."""

    graphdef: nnx.GraphDef
    init: nnx.State  # B = 0: the adapted model starts equal to the base
    scaling: float  # s = α / r

    def load(self, path: str) -> nnx.State:
        """Adapter parameters a finished stage saved at ``path``."""
        return load_params(path, self.init)

    def merged(self, ctx: RunContext, adapters: nnx.State) -> nnx.State:
        """The base parameters with ``adapters`` folded in, ``W + s·A@B``: the policy."""
        return merge_adapters(ctx.init_params, adapters, self.scaling, ctx.mesh)


def merge_adapters(base: nnx.State, adapters: nnx.State, scaling: float, mesh) -> nnx.State:
    """``W + s·A@B`` for every adapted kernel of ``base``, computed on ``mesh`` and left
    there with the base's training shardings, where the next stage reads it."""
    shardings = parallel.model_shardings(base, mesh)
    merge = jax.jit(lora.apply_lora, static_argnums=2, out_shardings=shardings)
    return merge(parallel.place_params(base, mesh), parallel.place_params(adapters, mesh), scaling)


def lora_training(
    base: Transformer,
    train_config: training.TrainConfig,
    loss_fn: training.LossFn,
    scaling: float,
    reference: nnx.State | None = None,
) -> tuple[training.TrainConfig, training.LossFn, Any]:
    """``(train config, loss, frozen)`` for :func:`jaxalign.loop.train` when LoRA adapters
    are the trained model over the frozen ``base`` (SPA, PLE, ``jaxalign dpo``): compute
    dtype and remat apply to the base, ``loss_fn`` sees base ⊕ adapters, and the base rides
    along as the step's ``frozen`` argument. With ``reference`` adapters, an on-the-fly
    reference base ⊕ ``reference`` rides along too."""
    base_graphdef, params = nnx.split(training.configure_model(base, train_config))
    on_the_fly = reference is not None
    loss = lora.lora_loss_fn(base_graphdef, loss_fn, scaling, reference=on_the_fly)
    frozen = {"base": params, "reference": reference} if on_the_fly else params
    return dataclasses.replace(train_config, compute_dtype=None, remat=None), loss, frozen


def lora_adapters(ctx: RunContext, rank: int, alpha: float, targets) -> Adapters:
    """Adapters of rank ``rank`` on every ``targets`` kernel of the loaded model, ``B = 0``
    (the adapted model starts equal to it) and ``A`` drawn from ``run.seed``."""
    adapters = lora.LoraAdapters(
        ctx.model(ctx.init_params), rank=rank, targets=targets, rngs=nnx.Rngs(ctx.config.run.seed)
    )
    graphdef, init = nnx.split(adapters)
    return Adapters(graphdef, init, lora.lora_scaling(rank, alpha))


def sampling_config(ctx: RunContext, **changes) -> SamplingConfig:
    """``config.sampling`` with the tokenizer's stop and pad ids, and ``changes``."""
    return ctx.config.sampling.replace(
        eos_token_ids=tuple(ctx.tokenizer.eos_token_ids),
        pad_token_id=ctx.tokenizer.pad_token_id,
        **changes,
    )


def load_judge(
    ctx: RunContext, name: str, *, batch_size: int, max_response_tokens: int
) -> judging.ResponseScorer:
    """A rule judge by ``name``, or the reward model in folder ``name``, reading prompts as
    the run's data does (``data.max_prompt_tokens``, chat template) with the run's tokenizer
    unless the folder has its own."""
    return load_reward_judge(
        name,
        tokenizer=ctx.tokenizer,
        batch_size=batch_size,
        max_prompt_tokens=ctx.config.data.max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        use_chat_template=ctx.config.data.use_chat_template,
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
        judge = load_judge(
            ctx,
            cfg.eval.judge,
            batch_size=cfg.run.generate_batch_size,
            max_response_tokens=cfg.eval.max_new_tokens,
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


# ----------------------------------------------------------------------------- exports

EXPORT_FOLDER = "model_hf"  # a round's model as a Hugging Face folder, with its model card
_TRAIN_STAGE = re.compile(r"round_(\d+)/train")


def finished_rounds(stages: dict) -> list[int]:
    """The rounds whose train stage a run's ``state.json`` records, in order."""
    return sorted(int(m.group(1)) for m in map(_TRAIN_STAGE.fullmatch, stages) if m)


def rounds_to_export(setting: str, finished: list[int]) -> list[int]:
    """Which finished rounds ``run.export_hf`` exports: ``last``, ``all`` or ``none``."""
    return {"last": finished[-1:], "all": list(finished), "none": []}[setting]


def _result(stages: dict, key: str) -> dict:
    return stages.get(key, {}).get("result", {})


def data_counts(algorithm: str, results: dict, up_to: int | None) -> tuple[list, list]:
    """A model card's data table, ``(rows, columns)``: what each round up to ``up_to`` read
    and trained on, from the stage ``results`` of a run's ``state.json`` (``jaxalign dpo``:
    the counts of its ``summary.json``)."""
    if algorithm == "dpo":
        columns = [
            ("pairs_read", "pairs read"),
            ("pairs_kept", "pairs kept"),
            ("pairs_skipped", "bad records skipped"),
            ("pairs_trained", "pairs trained on"),
            ("steps", "steps"),
        ]
        return ([results] if results else []), columns
    rows = []
    if algorithm == "ple":
        columns = [
            ("round", "iteration"),
            ("prompts", "queries"),
            ("ranking", "ranking pairs"),
            ("sft", "weighted-SFT examples"),
            ("steps", "steps"),
        ]
        sft = _result(results, "round_0/sft")
        if sft:
            rows.append(
                {"round": "SFT on D_sft", "sft": sft.get("sft_rows"), "steps": sft.get("steps")}
            )
        for i in finished_rounds(results):
            if up_to is not None and i > up_to:
                continue
            train = _result(results, f"round_{i}/train")
            rows.append(
                {
                    "round": i,
                    "prompts": _result(results, f"round_{i}/sample").get("prompts"),
                    "ranking": train.get("ranking_pairs"),
                    "sft": train.get("sft_rows"),
                    "steps": train.get("steps"),
                }
            )
        return rows, columns
    columns = [
        ("round", "round"),
        ("prompts", "new prompts"),
        ("kept", "pairs the judge kept"),
        ("pairs", "pairs trained on"),
        ("steps", "steps"),
    ]
    for i in finished_rounds(results):
        if up_to is not None and i > up_to:
            continue
        train = _result(results, f"round_{i}/train")
        rows.append(
            {
                "round": f"{i} (seed pairs)" if i == 0 else i,
                "prompts": _result(results, f"round_{i}/sample").get("prompts"),
                "kept": _result(results, f"round_{i}/judge").get("count/kept"),
                "pairs": train.get("pairs"),
                "steps": train.get("steps"),
            }
        )
    return rows, columns


def card_facts(
    config: dict,
    results: dict,
    round_index: int | None,
    *,
    name: str,
    summary_table: str | None = None,
    dtype: str = "float32",
) -> model_card.CardFacts:
    """What the model card of round ``round_index`` of a run says, from the run's config (as
    in its ``config.yaml``) and its stage ``results`` (``state.json``; ``jaxalign dpo``: its
    ``summary.json``)."""
    algorithm = config["run"]["algorithm"]
    base = config["model"]["name"]
    origin = provenance(base)
    data = config.get("data", {})
    sources = {"spa": ("seed_pairs", "prompts"), "ple": ("prompts",), "dpo": ("seed_pairs",)}
    datasets = [hub_id_of_path(str(data.get(k, ""))) for k in sources.get(algorithm, ())]
    if algorithm == "ple" and config.get("ple", {}).get("sft_data"):
        datasets.append(hub_id_of_path(config["ple"]["sft_data"]))
    planned = None
    if algorithm == "spa":
        planned = config.get("spa", {}).get("rounds", 0) + 1
    elif algorithm == "ple":
        planned = config.get("ple", {}).get("iterations")
    rows, columns = data_counts(algorithm, results, round_index)
    return model_card.CardFacts(
        algorithm=algorithm,
        name=name,
        base_model=base,
        base_hub_id=origin.hub_id,
        license=origin.license,
        round_index=round_index,
        rounds_finished=None if algorithm == "dpo" else tuple(finished_rounds(results)),
        rounds_planned=planned,
        config=config,
        data_rows=rows,
        data_columns=columns,
        summary_table=summary_table,
        datasets=tuple(dict.fromkeys(d for d in datasets if d)),
        dtype=dtype,
    )


def write_hf_folder(
    out: RunPath,
    model: Transformer,
    tokenizer,
    card: model_card.CardFacts,
    dtype: str | None = None,
) -> None:
    """``model`` as a Hugging Face folder at ``out`` with its ``README.md`` model card,
    all or nothing (:func:`jaxalign.algorithms.rounds.atomic_directory`); on ``gs://`` the
    folder is made locally, then uploaded. Only process 0 writes."""
    if not parallel.is_primary_process():
        return
    text = model_card.render(card, folder=str(out))
    if isinstance(out, pathlib.Path):
        with atomic_directory(out) as tmp:
            export_hf(model, tmp, tokenizer, dtype=dtype, model_card=text)
        return
    with tempfile.TemporaryDirectory(prefix="jaxalign-export-") as local:
        export_hf(model, local, tokenizer, dtype=dtype, model_card=text)
        with atomic_directory(out) as target:
            for file in sorted(pathlib.Path(local).iterdir()):
                write_bytes(target / file.name, file.read_bytes())


def export_stage(
    ctx: RunContext,
    round_index: int,
    params: nnx.State,
    results: dict,
    table: str | None,
    out: RunPath,
) -> dict:
    """Round ``round_index``'s model (``params``) as ``round_K/model_hf``, with a model card
    of the run's config, the stage ``results`` so far and its summary ``table``."""
    folder = out / EXPORT_FOLDER
    name = f"{ctx.run_dir.name} round {round_index}"
    facts = card_facts(to_dict(ctx.config), results, round_index, name=name, summary_table=table)
    write_hf_folder(folder, ctx.model(params), ctx.tokenizer, facts)
    return {"model_hf": str(folder)}


def export_models(
    ctx: RunContext,
    runner: RoundRunner,
    params_of: Callable[[int], nnx.State],
    table: str | None = None,
) -> list[str]:
    """Exports the finished rounds that ``run.export_hf`` selects (``last``: the final one;
    ``all``; ``none``), each a resumable ``export`` stage of its round; ``params_of(K)`` gives
    round ``K``'s parameters, ``table`` the run's summary table for the cards. Returns the
    folders."""
    rounds = rounds_to_export(ctx.config.run.export_hf, finished_rounds(runner.state["stages"]))
    folders = []
    for k in rounds:
        result = runner.stage(
            k,
            "export",
            lambda d, k=k: export_stage(ctx, k, params_of(k), runner.state["stages"], table, d),
        )
        folders.append(result["model_hf"])
        ctx.log(f"round {k}'s model: {result['model_hf']} (a Hugging Face folder, README.md card)")
    return folders
