"""Gold-judged quality benchmark: does SPA's self-annotation beat seed-only DPO?

Every arm starts from the embedded SmolLM2-135M-Instruct and is judged on the shipped
verifiable-instruction task (``jaxalign/data/instructions``, ``jaxalign.instructions``):
the gold score of a response is the fraction of its prompt's constraints it satisfies.

Arms
----
- ``sft``: the starting model.
- ``dpo_seed``: DPO on gold-labelled pairs of the seed prompts (3.3% of the train
  prompts, SPA's share of UltraFeedback's labels), 3 epochs. This is SPA's round 0.
- ``dpo_all``: DPO on gold-labelled pairs of every train prompt (the upper anchor), 3
  epochs (the SPA authors' advice below 2,000 pairs).
- ``spa``: the same seed DPO, then 3 self-annotated rounds on the other train prompts,
  split like the paper's 8K/20K/30K, with the paper's settings.
- ``spa_recommended``: the same, with the options ``configs/spa_instructions_smollm2.yaml``
  recommends.
Extra arms: ``--arm NAME="key=value ..."`` (SPA overrides on top of the paper's settings).

The labelled pool is ``--pool-samples`` (default 4) responses per train prompt sampled
from the SFT model at temperature 0.7 — like UltraFeedback's four completions per
prompt; a pair is the best against the worst by gold score, ties dropped.

Reported per arm (and per SPA round) on the held-out prompts (``--eval-split``, default
``eval``, 320 prompts; options are chosen on ``dev``): gold score; win rate against the
SFT model per prompt (``--eval-samples`` samples at T 0.7, default 2, mean gold per prompt;
and greedy) with a paired-bootstrap 95% interval; response length and EOS rate. Per SPA
round: the gold score, EOS rate and length of the round's own samples, self-label agreement
with the gold judge overall and by judged-margin tercile, the flagged fraction and how many
flagged pairs were mislabelled. And the comparisons the method is about: each arm minus
``dpo_seed`` in win rate (paired bootstrap), and the share of the ``dpo_seed`` →
``dpo_all`` gold-score gap an arm closes.

Every step writes its result to ``--out`` and is skipped when rerun, and the training
runs are ordinary resumable ``jaxalign run`` directories, so a killed benchmark
continues where it stopped. Output: one JSON line on stdout, ``results.json`` and
``results.md`` in ``--out``.

    python benchmarks/alignment.py --out runs/alignment              # the full benchmark
    python benchmarks/alignment.py --quick --out /tmp/alignment_quick # minutes, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK = ROOT / "jaxalign" / "data" / "instructions"
RECOMMENDED = ROOT / "configs" / "spa_instructions_smollm2.yaml"
PAPER_ROUND_SPLIT = (8000, 20000, 30000)  # SPA's prompts per round (Kim et al., Sec. 5.1)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every arm shares; ``--quick`` shrinks the sizes."""

    train_prompts: int = 1600
    # Label only the first N train prompts (0: all): the seed prompts and as many round
    # prompts as the SPA arms use, so dpo_all is DPO on the gold labels of every prompt SPA
    # sees (the paper's comparison) at the size a CPU session fits. The seed's size still
    # comes from train_prompts.
    pool_prompts: int = 0
    eval_prompts: int = 320
    seed_fraction: float = 0.033  # SPA: 2K of 60K UltraFeedback labels
    pool_samples: int = 4
    max_new_tokens: int = 96
    eval_samples: int = 2
    temperature: float = 0.7  # SPA's sampling temperature
    learning_rate: float = 5e-6
    batch_size: int = 8
    beta: float = 0.1  # SPA / DPO
    seed_epochs: int = 3  # SPA round 0
    all_epochs: int = 3
    rounds: int = 3
    generate_batch_size: int = 16
    seed: int = 0


QUICK = Settings(
    train_prompts=96,
    eval_prompts=24,
    seed_fraction=0.1,
    pool_samples=2,
    max_new_tokens=24,
    learning_rate=2e-5,
    seed_epochs=2,
    all_epochs=1,
    rounds=2,
)


# ----------------------------------------------------------------------------- files


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: pathlib.Path, records: Sequence[dict]) -> None:
    """All-or-nothing: a killed write leaves no file, so the step reruns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def log(message: str) -> None:
    print(f"[alignment {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models


class Models:
    """The embedded model, its tokenizer, and any trained parameters of a run, loaded once."""

    def __init__(self):
        from flax import nnx

        from jaxalign.models import load

        self.model, self.tokenizer = load("smollm2-135m-instruct")
        self.graphdef, self.init_params = nnx.split(self.model)

    def from_run(self, model_dir: pathlib.Path):
        import jax
        from flax import nnx

        from jaxalign import checkpoint

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.init_params)
        return nnx.merge(self.graphdef, checkpoint.load_params(model_dir, abstract))


def sample(
    models: Models,
    model,
    prompts: Sequence,
    settings: Settings,
    *,
    n: int,
    seed: int,
    greedy: bool = False,
):
    from jaxalign.generation import sample_texts
    from jaxalign.sampling import SamplingConfig

    tok = models.tokenizer
    config = SamplingConfig(
        n=n,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        greedy=greedy,
        eos_token_ids=tuple(tok.eos_token_ids),
        pad_token_id=tok.pad_token_id,
    )
    return sample_texts(
        model,
        tok,
        list(prompts),
        config,
        seed=seed,
        batch_size=max(1, settings.generate_batch_size * 2 // n),
        progress=True,
    )


def gold_scores(records: Sequence[dict], texts: Sequence[str]) -> list[float]:
    from jaxalign.instructions import InstructionChecker

    return [float(s) for s in InstructionChecker()([None] * len(texts), texts, records)]


# ----------------------------------------------------------------------------- data steps


def task_records(split: str, limit: int) -> list[dict]:
    """The first ``limit`` prompts of a split (all of them when it has fewer)."""
    return read_jsonl(TASK / f"{split}.jsonl")[:limit]


def pool_step(out: pathlib.Path, settings: Settings, models: Models) -> list[dict]:
    """``pool_samples`` SFT responses per train prompt, each gold-scored."""
    path = out / "pool.jsonl"
    if path.exists():
        return read_jsonl(path)
    records = task_records("train", settings.pool_prompts or settings.train_prompts)
    log(f"pool: {settings.pool_samples} SFT samples for each of {len(records)} train prompts")
    completions = sample(
        models,
        models.model,
        [r["prompt"] for r in records],
        settings,
        n=settings.pool_samples,
        seed=settings.seed + 1,
    )
    pool = []
    for record, group in zip(records, completions, strict=True):
        texts = [c.text for c in group]
        pool.append(
            {
                **record,
                "responses": [
                    {"text": c.text, "finished": c.finished, "num_tokens": len(c.token_ids)}
                    for c in group
                ],
                "gold": gold_scores([record] * len(texts), texts),
            }
        )
    write_jsonl(path, pool)
    return pool


def gold_pair(entry: dict) -> dict | None:
    """Best against worst response of a pool entry by gold score; None when all tie."""
    gold = entry["gold"]
    best, worst = int(np.argmax(gold)), int(np.argmin(gold))
    if gold[best] == gold[worst]:
        return None
    chosen, rejected = entry["responses"][best], entry["responses"][worst]
    return {
        "id": entry["id"],
        "prompt": entry["prompt"],
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "chosen_eos": chosen["finished"],
        "rejected_eos": rejected["finished"],
        "constraints": entry["constraints"],
    }


def data_step(out: pathlib.Path, settings: Settings, pool: list[dict]) -> dict:
    """Seed pairs, all pairs and the round prompts, as files the training runs read."""
    data = out / "data"
    files = {k: data / f"{k}.jsonl" for k in ("seed_pairs", "all_pairs", "round_prompts")}
    n_seed = max(1, round(settings.seed_fraction * settings.train_prompts))
    if n_seed >= len(pool):
        raise SystemExit(f"--pool-prompts {len(pool)} leaves no round prompts after {n_seed} seed")
    if not all(p.exists() for p in files.values()):
        pairs = [gold_pair(e) for e in pool]
        write_jsonl(files["seed_pairs"], [p for p in pairs[:n_seed] if p])
        write_jsonl(files["all_pairs"], [p for p in pairs if p])
        write_jsonl(
            files["round_prompts"],
            [
                {"id": e["id"], "prompt": e["prompt"], "constraints": e["constraints"]}
                for e in pool[n_seed:]
            ],
        )
    counts = {k: len(read_jsonl(p)) for k, p in files.items()}
    total = counts["round_prompts"]
    weights = np.asarray(PAPER_ROUND_SPLIT[: settings.rounds], np.float64)
    per_round = np.floor(total * weights / weights.sum()).astype(int)
    per_round[-1] = total - per_round[:-1].sum()
    return {
        "files": {k: str(p) for k, p in files.items()},
        "counts": counts | {"seed_prompts": n_seed},
        "prompts_per_round": [int(x) for x in per_round],
    }


# ----------------------------------------------------------------------------- training arms


def base_overrides(settings: Settings, data: dict, run_dir: pathlib.Path) -> list[str]:
    """The paper's SPA settings at this benchmark's scale, and its data."""
    files = data["files"]
    return [
        "run.algorithm=spa",
        f"run.output_dir={run_dir}",
        f"run.seed={settings.seed}",
        f"run.generate_batch_size={settings.generate_batch_size}",
        "model.name=smollm2-135m-instruct",
        f"data.seed_pairs={files['seed_pairs']}",
        f"data.prompts={files['round_prompts']}",
        "data.max_prompt_tokens=128",
        f"data.max_response_tokens={settings.max_new_tokens}",
        f"sampling.temperature={settings.temperature}",
        "sampling.top_p=1.0",
        f"sampling.max_new_tokens={settings.max_new_tokens}",
        f"train.learning_rate={settings.learning_rate}",
        f"train.batch_size={settings.batch_size}",
        f"train.beta={settings.beta}",
        "train.logp_chunk_size=64",
        f"spa.seed_epochs={settings.seed_epochs}",
        "spa.round_epochs=1",
        f"spa.prompts_per_round={data['prompts_per_round']}",
        *paper_spa_overrides(),
        "eval.enabled=false",
    ]


def paper_spa_overrides() -> list[str]:
    """Every other ``spa`` field at its paper default (``SPAConfig``'s), so an arm never
    inherits the options of the config ``jaxalign run`` starts from (the demo's
    ``judge_reward: mean``): an arm's own overrides come after these and win."""
    from jaxalign.config import SPAConfig

    set_here = {"rounds", "prompts_per_round", "seed_epochs", "round_epochs"}
    return [
        f"spa.{f.name}={json.dumps(getattr(SPAConfig(), f.name), separators=(',', ':'))}"
        for f in dataclasses.fields(SPAConfig)
        if f.name not in set_here
    ]


def recommended_overrides() -> list[str]:
    """The ``spa`` group of the recommended config, as overrides."""
    config = yaml.safe_load(RECOMMENDED.read_text()) if RECOMMENDED.exists() else {}
    return [
        f"spa.{k}={json.dumps(v, separators=(',', ':'))}"
        for k, v in (config.get("spa") or {}).items()
        if k not in ("rounds", "prompts_per_round", "seed_epochs", "round_epochs")
    ]


def arm_overrides(
    name: str, settings: Settings, data: dict, run_dir: pathlib.Path, extra: dict[str, str]
) -> list[str]:
    base = base_overrides(settings, data, run_dir)
    if name == "dpo_seed":
        return [*base, "spa.rounds=0"]
    if name == "dpo_all":
        return [
            *base,
            "spa.rounds=0",
            f"data.seed_pairs={data['files']['all_pairs']}",
            f"spa.seed_epochs={settings.all_epochs}",
        ]
    if name == "spa":
        return [*base, f"spa.rounds={settings.rounds}"]
    if name == "spa_recommended":
        return [*base, f"spa.rounds={settings.rounds}", *recommended_overrides()]
    if name in extra:
        return [*base, f"spa.rounds={settings.rounds}", *shlex.split(extra[name])]
    raise SystemExit(f"unknown arm {name!r}")


def train_step(name: str, out: pathlib.Path, overrides: list[str]) -> pathlib.Path:
    """Runs (or resumes) the arm's ``jaxalign run``; returns its run directory."""
    run_dir = out / "runs" / name
    state = run_dir / "state.json"
    logfile = out / "logs" / f"{name}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"train {name}: jaxalign run {' '.join(overrides[1:2])} ... (log: {logfile})")
    cmd = [sys.executable, "-m", "jaxalign", "run", "run.progress=false", *overrides]
    with logfile.open("a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0 or not state.exists():
        raise SystemExit(
            f"arm {name}: jaxalign run failed (exit {result.returncode}); see {logfile}"
        )
    return run_dir


def round_models(run_dir: pathlib.Path) -> dict[int, pathlib.Path]:
    stages = json.loads((run_dir / "state.json").read_text())["stages"]
    found = {}
    for key, entry in stages.items():
        round_name, stage = key.split("/")
        if stage == "train":
            found[int(round_name.split("_")[1])] = pathlib.Path(entry["result"]["model"])
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------- evaluation


def eval_step(
    out: pathlib.Path, key: str, settings: Settings, models: Models, model, records: list[dict]
) -> list[dict]:
    """Two samples at T 0.7 and a greedy answer per eval prompt, gold-scored (cached)."""
    path = out / "eval" / f"{key}.jsonl"
    if path.exists():
        return read_jsonl(path)
    log(f"eval {key}: {len(records)} prompts")
    prompts = [r["prompt"] for r in records]
    sampled = sample(
        models, model, prompts, settings, n=settings.eval_samples, seed=settings.seed + 7
    )
    greedy = sample(models, model, prompts, settings, n=1, seed=0, greedy=True)
    rows = []
    for record, group, (g,) in zip(records, sampled, greedy, strict=True):
        texts = [c.text for c in group] + [g.text]
        scores = gold_scores([record] * len(texts), texts)
        rows.append(
            {
                "id": record["id"],
                "samples": [
                    {
                        "text": c.text,
                        "finished": c.finished,
                        "num_tokens": len(c.token_ids),
                        "gold": s,
                    }
                    for c, s in zip(group, scores, strict=False)
                ],
                "greedy": {
                    "text": g.text,
                    "finished": g.finished,
                    "num_tokens": len(g.token_ids),
                    "gold": scores[-1],
                },
            }
        )
    write_jsonl(path, rows)
    return rows


def per_prompt(rows: list[dict], mode: str) -> np.ndarray:
    if mode == "greedy":
        return np.asarray([r["greedy"]["gold"] for r in rows])
    return np.asarray([np.mean([s["gold"] for s in r["samples"]]) for r in rows])


def outcomes(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    return np.where(ours > theirs, 1.0, np.where(ours < theirs, 0.0, 0.5))


def summarise_eval(rows: list[dict], sft: list[dict]) -> dict:
    from jaxalign.evaluation import paired_bootstrap

    result: dict[str, Any] = {}
    for mode in ("sample", "greedy"):
        gold = per_prompt(rows, mode)
        wins = outcomes(gold, per_prompt(sft, mode))
        low, high = paired_bootstrap(wins)
        result[mode] = {
            "gold": float(gold.mean()),
            "win_rate": float(wins.mean()),
            "win_ci": [low, high],
        }
    responses = [s for r in rows for s in r["samples"]]
    result["mean_tokens"] = float(np.mean([s["num_tokens"] for s in responses]))
    result["mean_words"] = float(np.mean([len(s["text"].split()) for s in responses]))
    result["eos_rate"] = float(np.mean([s["finished"] for s in responses]))
    result["greedy_eos_rate"] = float(np.mean([r["greedy"]["finished"] for r in rows]))
    return result


def constraint_rates(rows: list[dict], records: dict[str, dict]) -> dict[str, float]:
    """Per constraint type, the share of sampled responses that satisfy it (each prompt's
    constraints checked on each of its samples): which instructions an arm learned."""
    from jaxalign.instructions import check

    met: dict[str, list[bool]] = {}
    for row in rows:
        for constraint in records[row["id"]]["constraints"]:
            met.setdefault(constraint["type"], []).extend(
                check(constraint, s["text"]) for s in row["samples"]
            )
    return {kind: float(np.mean(v)) for kind, v in sorted(met.items())}


# ----------------------------------------------------------------------------- SPA rounds


def tercile_agreement(margins: np.ndarray, agree: np.ndarray, separated: np.ndarray) -> list:
    """Agreement with the gold labels in each third of the judged margins (low → high)."""
    order = np.argsort(margins, kind="stable")
    out = []
    for part in np.array_split(order, 3):
        mask = separated[part]
        out.append(float(agree[part][mask].mean()) if mask.any() else None)
    return out


def round_diagnostics(run_dir: pathlib.Path, prompts: dict[str, dict]) -> list[dict]:
    """Per self-annotated round: its samples' quality and its self-labels' accuracy."""
    stages = json.loads((run_dir / "state.json").read_text())["stages"]
    rows = []
    i = 1
    while f"round_{i}/judge" in stages:
        candidates = read_jsonl(pathlib.Path(stages[f"round_{i}/sample"]["result"]["candidates"]))
        pairs = read_jsonl(pathlib.Path(stages[f"round_{i}/judge"]["result"]["pairs"]))
        responses = [x for c in candidates for x in c["responses"]]
        sample_gold = [
            s
            for c in candidates
            for s in gold_scores(
                [prompts[c["id"]]] * len(c["responses"]), [x["text"] for x in c["responses"]]
            )
        ]
        records = [prompts[p["id"]] for p in pairs]
        g_c = np.asarray(gold_scores(records, [p["chosen"] for p in pairs]))
        g_r = np.asarray(gold_scores(records, [p["rejected"] for p in pairs]))
        separated = g_c != g_r
        agree = g_c > g_r
        margins = np.asarray([p["margin"] for p in pairs])
        row = {
            "round": i,
            "samples_gold": float(np.mean(sample_gold)),
            "samples_eos_rate": float(np.mean([x["finished"] for x in responses])),
            "samples_mean_tokens": float(np.mean([x["num_tokens"] for x in responses])),
            "pairs": len(pairs),
            "gold_separated": int(separated.sum()),
            "agreement": float(agree[separated].mean()) if separated.any() else None,
            "agreement_by_margin_tercile": tercile_agreement(margins, agree, separated),
            "chosen_longer": float(np.mean([len(p["chosen"]) > len(p["rejected"]) for p in pairs]))
            if pairs
            else None,
        }
        train = stages.get(f"round_{i}/train", {}).get("result", {})
        row["flagged_fraction"] = train.get("mean/spa/flagged_fraction")
        flags_path = run_dir / f"round_{i}" / "refinement.jsonl"
        if flags_path.exists():
            by_id = {p["id"]: k for k, p in enumerate(pairs)}
            flagged = [by_id[f["id"]] for f in read_jsonl(flags_path) if f.get("flagged")]
            flagged = [k for k in flagged if separated[k]]
            row["flagged_separated"] = len(flagged)
            row["flagged_mislabelled"] = int(sum(not agree[k] for k in flagged))
        rows.append(row)
        i += 1
    return rows


# ----------------------------------------------------------------------------- report


def gap_closed(arm_gold: np.ndarray, seed_gold: np.ndarray, all_gold: np.ndarray) -> dict:
    """Share of the dpo_seed → dpo_all gold gap an arm closes, with a paired bootstrap."""
    from jaxalign.evaluation import bootstrap_statistic

    def share(idx):
        gap = all_gold[idx].mean() - seed_gold[idx].mean()
        return (arm_gold[idx].mean() - seed_gold[idx].mean()) / gap if gap else float("nan")

    low, high = bootstrap_statistic(share, len(arm_gold))
    return {"share": float(share(np.arange(len(arm_gold)))), "ci": [low, high]}


def comparisons(evals: dict[str, list[dict]], sft: list[dict], anchor: str = "dpo_all") -> dict:
    """Each arm's win rate minus DPO-seed's, and the share of the DPO-seed → ``anchor`` gold
    gap it closes (``anchor``: the arm trained on every gold label)."""
    from jaxalign.evaluation import paired_bootstrap

    result = {}
    if "dpo_seed" not in evals:
        return result
    for mode in ("sample", "greedy"):
        sft_gold = per_prompt(sft, mode)
        seed_wins = outcomes(per_prompt(evals["dpo_seed"], mode), sft_gold)
        for arm, rows in evals.items():
            if arm == "dpo_seed":
                continue
            diff = outcomes(per_prompt(rows, mode), sft_gold) - seed_wins
            low, high = paired_bootstrap(diff)
            entry = {"win_rate_minus_dpo_seed": float(diff.mean()), "ci": [low, high]}
            if anchor in evals and arm != anchor:
                entry["gap_closed"] = gap_closed(
                    per_prompt(rows, mode),
                    per_prompt(evals["dpo_seed"], mode),
                    per_prompt(evals[anchor], mode),
                )
            result.setdefault(arm, {})[mode] = entry
    return result


def markdown(results: dict) -> str:
    lines = [
        f"| model | gold ({results['settings']['eval_samples']} samples) | win vs SFT [95% CI] "
        "| greedy gold | greedy win vs SFT "
        "[95% CI] | EOS rate | mean tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, e in results["models"].items():
        s, g = e["sample"], e["greedy"]
        lines.append(
            f"| {key} | {s['gold']:.3f} | {s['win_rate']:.3f} [{s['win_ci'][0]:.3f}, "
            f"{s['win_ci'][1]:.3f}] | {g['gold']:.3f} | {g['win_rate']:.3f} "
            f"[{g['win_ci'][0]:.3f}, {g['win_ci'][1]:.3f}] | {e['eos_rate']:.2f} | "
            f"{e['mean_tokens']:.1f} |"
        )
    if results.get("comparisons"):
        lines += [
            "",
            "| arm − dpo_seed | Δ win rate (samples) [95% CI] | gap closed (samples) "
            "[95% CI] | Δ win rate (greedy) [95% CI] |",
            "|---|---|---|---|",
        ]
        for arm, c in results["comparisons"].items():
            s, g = c["sample"], c["greedy"]
            gap = s.get("gap_closed")
            gap_text = (
                f"{gap['share']:.2f} [{gap['ci'][0]:.2f}, {gap['ci'][1]:.2f}]" if gap else "—"
            )
            lines.append(
                f"| {arm} | {s['win_rate_minus_dpo_seed']:+.3f} [{s['ci'][0]:+.3f}, "
                f"{s['ci'][1]:+.3f}] | {gap_text} | {g['win_rate_minus_dpo_seed']:+.3f} "
                f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] |"
            )
    rates = results.get("constraints", {})
    if rates:
        models = list(rates)
        kinds = sorted({k for r in rates.values() for k in r}, key=lambda k: -rates[models[0]][k])
        lines += [
            "",
            "| constraint met (samples) | " + " | ".join(models) + " |",
            "|---|" + "---|" * len(models),
        ]
        for kind in kinds:
            cells = " | ".join(f"{rates[m][kind]:.2f}" if kind in rates[m] else "—" for m in models)
            lines.append(f"| {kind} | {cells} |")
    for arm, rounds in results.get("rounds", {}).items():
        lines += [
            "",
            f"**{arm}: self-annotated rounds**",
            "",
            "| round | samples gold | samples EOS | samples tokens | pairs | agreement "
            "(separated) | agreement by margin tercile | chosen longer | flagged | "
            "flagged mislabelled |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rounds:
            terciles = " / ".join(
                "—" if t is None else f"{t:.2f}" for t in r["agreement_by_margin_tercile"]
            )
            agreement = "—" if r["agreement"] is None else f"{r['agreement']:.2f}"
            flagged = "—" if r["flagged_fraction"] is None else f"{r['flagged_fraction']:.2f}"
            mislabelled = (
                f"{r['flagged_mislabelled']}/{r['flagged_separated']}"
                if "flagged_mislabelled" in r
                else "—"
            )
            lines.append(
                f"| {r['round']} | {r['samples_gold']:.3f} | {r['samples_eos_rate']:.2f} | "
                f"{r['samples_mean_tokens']:.1f} | {r['pairs']} | {agreement} "
                f"({r['gold_separated']}) | {terciles} | {r['chosen_longer']:.2f} | {flagged} | "
                f"{mislabelled} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/alignment", help="benchmark directory")
    parser.add_argument("--quick", action="store_true", help="CI-sized run (minutes)")
    parser.add_argument(
        "--arms",
        default="sft,dpo_seed,dpo_all,spa,spa_recommended",
        help="comma-separated arms to run",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar='NAME="k=v ..."',
        help="an extra SPA arm with these config overrides",
    )
    parser.add_argument(
        "--eval-split",
        default="eval",
        choices=("eval", "dev"),
        help="held-out prompts to report on (choose options on dev)",
    )
    parser.add_argument("--pool-samples", type=int, default=None)
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="sampled responses per eval prompt (default 2; more narrow the intervals)",
    )
    parser.add_argument(
        "--pool-prompts",
        type=int,
        default=None,
        help="label only the first N train prompts (seed + the rounds' prompts; default all)",
    )
    parser.add_argument(
        "--anchor",
        default="dpo_all",
        help="the arm trained on every gold label, whose gap to dpo_seed arms are measured on",
    )
    parser.add_argument(
        "--eval-rounds",
        default="all",
        choices=("all", "final"),
        help="evaluate every SPA round (the report) or only each arm's last (to choose options)",
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="evaluate the rounds each arm's run has finished, without starting or resuming "
        "its training (a run stopped early)",
    )
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else Settings()
    if args.pool_samples is not None:
        settings = dataclasses.replace(settings, pool_samples=args.pool_samples)
    if args.eval_samples is not None:
        settings = dataclasses.replace(settings, eval_samples=args.eval_samples)
    if args.pool_prompts is not None:
        settings = dataclasses.replace(settings, pool_prompts=args.pool_prompts)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = {}
    for item in args.arm:
        name, _, overrides = item.partition("=")
        extra[name.strip()] = overrides
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] + list(extra)
    settings_file = out / "settings.json"
    wanted = dataclasses.asdict(settings)
    if settings_file.exists() and json.loads(settings_file.read_text()) != wanted:
        raise SystemExit(f"{out} holds a benchmark with other settings; use a new --out")
    settings_file.write_text(json.dumps(wanted, indent=1))
    start = time.perf_counter()

    models = Models()
    pool = pool_step(out, settings, models)
    data = data_step(out, settings, pool)
    log(f"data: {data['counts']}, prompts per round {data['prompts_per_round']}")
    eval_records = task_records(args.eval_split, settings.eval_prompts)
    # Every train prompt by id: an extra arm may draw its rounds' prompts beyond the pool
    # (data.prompts=...), and its rounds' diagnostics gold-score them too.
    prompts = {r["id"]: r for r in task_records("train", settings.train_prompts)}

    split = args.eval_split
    sft = eval_step(out, f"{split}__sft", settings, models, models.model, eval_records)
    by_id = {r["id"]: r for r in eval_records}
    evals: dict[str, list[dict]] = {}
    models_summary: dict[str, dict] = {"sft": summarise_eval(sft, sft)}
    rates: dict[str, dict[str, float]] = {"sft": constraint_rates(sft, by_id)}
    rounds: dict[str, list[dict]] = {}
    for arm in arms:
        if arm == "sft":
            continue
        if args.no_train:
            run_dir = out / "runs" / arm
            if not (run_dir / "state.json").exists():
                raise SystemExit(f"--no-train: arm {arm} has no run in {run_dir}")
        else:
            run_dir = train_step(
                arm, out, arm_overrides(arm, settings, data, out / "runs" / arm, extra)
            )
        trained = round_models(run_dir)
        if args.eval_rounds == "final":
            trained = {max(trained): trained[max(trained)]}
        for k, model_dir in trained.items():
            key = arm if arm.startswith("dpo") else f"{arm}/round_{k}"
            rows = eval_step(
                out,
                f"{split}__{key.replace('/', '__')}",
                settings,
                models,
                models.from_run(model_dir),
                eval_records,
            )
            models_summary[key] = summarise_eval(rows, sft)
            rates[key] = constraint_rates(rows, by_id)
        evals[arm] = rows  # the arm's last round
        if not arm.startswith("dpo"):
            rounds[arm] = round_diagnostics(run_dir, prompts)

    results = {
        "benchmark": "alignment",
        "quick": args.quick,
        "eval_split": split,
        "settings": wanted,
        "data": data["counts"] | {"prompts_per_round": data["prompts_per_round"]},
        "models": models_summary,
        "comparisons": comparisons(evals, sft, args.anchor),
        "constraints": rates,
        "rounds": rounds,
        "seconds_this_invocation": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
