"""``jaxalign eval``: a model against a baseline on a prompt file.

    jaxalign eval --model runs/spa_demo --baseline smollm2-135m-instruct \\
        --prompts demo --judge demo-checker --out eval_out

``--model`` and ``--baseline`` take what :func:`jaxalign.loading.load` takes: a registered
name, a Hugging Face folder (e.g. ``runs/spa_demo/round_2/model_hf``), a ``.gguf`` file,
or a run (``runs/spa_demo``: its last round that finished training; ``runs/spa_demo/round_1``).

Both models answer every prompt (greedy by default, or ``--temperature T``); a
gold judge scores the answers and the win rate of the model over the baseline
(ties count ½, with a 95% interval) is printed with length statistics and a
Monte-Carlo estimate of ``KL(model ‖ baseline)`` from ``--kl-samples`` fresh
samples of the model at temperature 1 per prompt.

Judges (``--judge``): a rule judge (``demo-checker``, needs records with
``answer``), ``reward:FOLDER`` (a local Hugging Face sequence-classification
reward model with its tokenizer; the higher reward wins), or
``verdicts:FILE.jsonl`` with an external judge's verdicts, one line per prompt
id: ``{"id", "winner": "model"|"baseline"|"tie"}`` or
``{"id", "score", "baseline_score"}``. The usual loop with an external judge:

    jaxalign eval ... --out D --export alpaca_eval      # answers for the judge
    (judge D/alpaca_eval/*/model_outputs.json externally; write verdicts.jsonl)
    jaxalign eval ... --answers D/answers.jsonl --judge verdicts:verdicts.jsonl

``--out DIR`` receives ``answers.jsonl`` (both answers and their scores per
prompt), ``kl_samples.jsonl`` and ``eval.json`` (everything printed), plus the
exports asked for with ``--export alpaca_eval|mt_bench``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jaxalign.cli import flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxalign.models.llama import DTYPE_NAMES

    parser.add_argument(
        "--model",
        required=True,
        help="model A: registered name, HF folder, .gguf, or a run (RUN_DIR: its last round; "
        "RUN_DIR/round_K)",
    )
    parser.add_argument(
        "--baseline", required=True, help="model B, the reference (e.g. the SFT); same forms"
    )
    parser.add_argument(
        "--prompts", required=True, help="JSONL of {id?, prompt, answer?} ('demo': demo eval set)"
    )
    parser.add_argument(
        "--judge",
        default=None,
        help="gold judge: a rule name (demo-checker), rule:NAME, verdicts:FILE.jsonl or "
        "reward:FOLDER (a local reward model); "
        "without one, no win rate is computed",
    )
    parser.add_argument("--max-new-tokens", type=flags.positive_int, default=128)
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    decoding.add_argument(
        "--temperature", type=flags.positive_number, default=None, help="sample at T instead"
    )
    parser.add_argument(
        "--max-prompts", type=flags.positive_int, default=None, help="use the first N prompts"
    )
    parser.add_argument(
        "--kl-samples",
        type=flags.non_negative_int,
        default=1,
        help="samples of the model per prompt (temperature 1) for the KL estimate; 0 skips it",
    )
    parser.add_argument(
        "--batch-size", type=flags.positive_int, default=8, help="prompts per decode batch"
    )
    parser.add_argument("--seed", type=flags.seed, default=0)
    parser.add_argument("--out", default=None, help="folder for answers, eval.json and exports")
    parser.add_argument(
        "--export",
        action="append",
        default=[],
        choices=("alpaca_eval", "mt_bench"),
        help="also write the answers for AlpacaEval 2.0 or MT-Bench (repeatable; needs --out)",
    )
    parser.add_argument("--name", default=None, help="the model's name in exports")
    parser.add_argument("--baseline-name", default=None, help="the baseline's name in exports")
    parser.add_argument(
        "--answers",
        default=None,
        help="reuse the answers.jsonl of an earlier `jaxalign eval` instead of generating",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="compute dtype")
    parser.add_argument("--on-bad-record", default="error", choices=("error", "skip"))
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _display_name(spec: str) -> str:
    path = pathlib.Path(spec)
    return path.stem if path.suffix == ".gguf" else (path.name or str(spec))


def _read_answers(path: str, records: list[dict]):
    """``(answers, baseline_answers)`` as Candidates, in the order of ``records``."""
    from jaxalign.algorithms.rounds import read_jsonl
    from jaxalign.judging import Candidate

    by_id = {str(r.get("id")): r for r in read_jsonl(path)}
    missing = [r["id"] for r in records if str(r["id"]) not in by_id]
    if missing:
        raise ValueError(
            f"{path}: no answers for {len(missing)} prompts (first: {missing[0]!r}); "
            "use the same --prompts as the run that wrote it"
        )
    ours, base = [], []
    for r in records:
        a = by_id[str(r["id"])]
        try:
            ours.append(Candidate(a["response"], a["finished"], a["num_tokens"]))
            base.append(Candidate(a["baseline"], a["baseline_finished"], a["baseline_num_tokens"]))
        except KeyError as e:
            raise ValueError(
                f"{path}: record {r['id']!r} lacks field {e}; it must come from `jaxalign eval`"
            ) from None
    return ours, base


def _answer(model, tokenizer, records, config, args, seed):
    from jaxalign.generation import sample_texts

    return sample_texts(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        config,
        seed=seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> dict:
    """Everything ``main`` does, returning the summary written to ``eval.json``."""
    import numpy as np

    from jaxalign import evaluation, scoring
    from jaxalign.algorithms.rounds import atomic_write_jsonl, atomic_write_text
    from jaxalign.data.records import read_prompt_records
    from jaxalign.judging import Candidate
    from jaxalign.loading import load
    from jaxalign.sampling import SamplingConfig

    if args.export and not args.out:
        raise ValueError("--export needs --out DIR to write the files to")
    records, report = read_prompt_records(args.prompts, args.on_bad_record, kind="eval")
    records = records[: args.max_prompts] if args.max_prompts else records
    if not records:
        raise ValueError(f"{args.prompts}: no prompts to evaluate")
    judge = evaluation.make_judge(args.judge) if args.judge else None
    greedy = args.temperature is None
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=1.0 if greedy else args.temperature,
        greedy=greedy,
        n=1,
    )
    kl_config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, n=1)
    # Answers sampled from the model itself at temperature 1 already are KL samples.
    reuse_for_kl = args.kl_samples == 1 and not greedy and config == kl_config

    def candidates(comps):
        return [Candidate(c[0].text, c[0].finished, len(c[0].token_ids)) for c in comps]

    answers = baseline_answers = None
    if args.answers:
        answers, baseline_answers = _read_answers(args.answers, records)
    kl_prompts, kl_tokens, kl_texts, logp_model, logp_ref = [], [], [], None, None
    need_models = answers is None or args.kl_samples > 0
    if need_models:
        model, tokenizer = load(args.model, dtype=args.dtype)
        if answers is None:
            comps = _answer(model, tokenizer, records, config, args, args.seed)
            answers = candidates(comps)
        if args.kl_samples > 0:
            if reuse_for_kl and not args.answers:
                samples = comps
            else:
                samples = _answer(
                    model,
                    tokenizer,
                    records,
                    kl_config.replace(n=args.kl_samples),
                    args,
                    args.seed + 1,
                )
            for r, group in zip(records, samples, strict=True):
                for c in group:
                    kl_prompts.append(r)
                    kl_tokens.append(c.token_ids)
                    kl_texts.append(c.text)
            prompts = [r["prompt"] for r in kl_prompts]
            logp_model = scoring.response_logprobs(
                model, tokenizer, prompts, kl_tokens, batch_size=args.batch_size
            )
        if args.baseline != args.model:
            del model
            model, tokenizer = load(args.baseline, dtype=args.dtype)
        if baseline_answers is None:
            baseline_answers = candidates(
                _answer(model, tokenizer, records, config, args, args.seed)
            )
        if args.kl_samples > 0:
            logp_ref = scoring.response_logprobs(
                model,
                tokenizer,
                [r["prompt"] for r in kl_prompts],
                kl_tokens,
                batch_size=args.batch_size,
            )

    summary: dict = {
        "model": args.model,
        "baseline": args.baseline,
        "prompts": report.path,
        "n": len(records),
        "decoding": "greedy" if greedy else f"temperature {args.temperature}",
        "max_new_tokens": args.max_new_tokens,
        "judge": judge.name if judge else None,
        "lengths": {
            "model": evaluation.length_stats(answers),
            "baseline": evaluation.length_stats(baseline_answers),
        },
    }
    scores = base_scores = None
    if judge is not None:
        scores, base_scores = judge.compare(records, answers, baseline_answers)
        wr = evaluation.win_rate(scores, base_scores)
        summary["win_rate"] = wr.to_dict()
        summary["gold_score"] = float(np.mean(scores))
        summary["baseline_gold_score"] = float(np.mean(base_scores))
    if logp_model is not None:
        kl = evaluation.kl_estimate(logp_model, logp_ref, [len(t) for t in kl_tokens])
        summary["kl"] = kl.to_dict() | {"samples_per_prompt": args.kl_samples}

    if args.out:
        out = pathlib.Path(args.out)
        rows = []
        for i, (r, a, b) in enumerate(zip(records, answers, baseline_answers, strict=True)):
            row = {"id": r["id"], "prompt": r["prompt"]}
            row |= {"response": a.text, "finished": a.finished, "num_tokens": a.num_tokens}
            row |= {
                "baseline": b.text,
                "baseline_finished": b.finished,
                "baseline_num_tokens": b.num_tokens,
            }
            if scores is not None:
                row |= {"score": float(scores[i]), "baseline_score": float(base_scores[i])}
            rows.append(row)
        atomic_write_jsonl(out / "answers.jsonl", rows)
        if logp_model is not None:
            atomic_write_jsonl(
                out / "kl_samples.jsonl",
                [
                    {
                        "id": r["id"],
                        "response": text,
                        "num_tokens": len(ids),
                        "logp_model": float(lm),
                        "logp_baseline": float(lb),
                    }
                    for r, text, ids, lm, lb in zip(
                        kl_prompts, kl_texts, kl_tokens, logp_model, logp_ref, strict=True
                    )
                ],
            )
        name = args.name or _display_name(args.model)
        baseline_name = args.baseline_name or _display_name(args.baseline)
        if baseline_name == name and not args.baseline_name:
            baseline_name = f"{name}-baseline"
        if baseline_name == name and args.export:
            raise ValueError("the model and the baseline need different --name/--baseline-name")
        names = {
            name: [a.text for a in answers],
            baseline_name: [b.text for b in baseline_answers],
        }
        exported = []
        for fmt in dict.fromkeys(args.export):
            exported += [str(p) for p in evaluation.export_answers(fmt, out, records, names)]
        summary["exports"] = exported
        atomic_write_text(out / "eval.json", json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """The lines ``jaxalign eval`` prints."""
    lines = [
        f"{summary['model']} vs {summary['baseline']} on {summary['n']} prompts "
        f"({summary['decoding']}, up to {summary['max_new_tokens']} new tokens)"
    ]
    if "win_rate" in summary:
        w = summary["win_rate"]
        lines.append(
            f"  win rate {w['rate']:.3f}  95% CI [{w['ci_low']:.3f}, {w['ci_high']:.3f}]  "
            f"(wins {w['wins']}, ties {w['ties']}, losses {w['losses']}; judge {summary['judge']})"
        )
        lines.append(
            f"  gold score {summary['gold_score']:.3f} vs {summary['baseline_gold_score']:.3f}"
        )
    for who in ("model", "baseline"):
        s = summary["lengths"][who]
        lines.append(
            f"  {who:8s} words mean {s['mean_words']:.1f} median {s['median_words']:.1f}, "
            f"tokens mean {s['mean_tokens']:.1f} max {s['max_tokens']}, "
            f"ended by EOS {s['finished_fraction']:.0%}"
        )
    if "kl" in summary:
        k = summary["kl"]
        lines.append(
            f"  KL(model || baseline) ≈ {k['kl']:.4f} ± {k['stderr']:.4f} nats/response "
            f"({k['kl_per_token']:.4f}/token; {k['n']} samples)"
        )
    for path in summary.get("exports", []):
        lines.append(f"  exported {path}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from jaxalign.data.records import DataError

    if args.export and not args.out:  # a usage error: refused like a bad flag, nothing run
        print("jaxalign eval: --export needs --out DIR to write the files to", file=sys.stderr)
        return 2
    try:
        summary = run(args)
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"jaxalign eval: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    if args.out:
        print(f"wrote {pathlib.Path(args.out) / 'eval.json'}")
    return 0
