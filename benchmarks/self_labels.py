"""How right are SPA's self-labels? Judge variants against a gold judge, on held-out prompts.

SPA labels a prompt's sampled responses with the policy's own implicit reward against the
initial model, ``r(x, y) = β·Σ_t ℓ_t`` with ``ℓ_t = log π(y_t|·) − log π_init(y_t|·)``.
This script samples ``--samples`` responses per prompt from a run's round model ``π``,
scores every response token by token under ``π`` and ``π_init`` (the exact sampled tokens),
and measures how often each way of turning those numbers into a pair agrees with the gold
judge (``jaxalign.instructions``), on the task's ``dev`` prompts by default (the split for
choosing options; never the reported ``eval`` split):

- reward: ``sum`` (SPA), ``mean`` (divided by the response length), ``centered``
  (``Σ_t ℓ_t − E_{v∼q_t} ℓ_t(v)``: each token's log-ratio minus its expectation under the
  sampling distribution ``q_t``, so that an on-policy sample's reward has mean 0 at any
  length, where the summed reward grows by about the per-token KL with every token);
- pairing: the first two samples (SPA) or the best against the worst of all;
- a response cut at the token limit: ``keep`` (SPA), ``skip``, ``reject``
  (:func:`jaxalign.judging.select_pair`).

For each variant: pairs formed, agreement with the gold labels over the pairs gold
separates (with a bootstrap interval) and by judged-margin tercile, how often the chosen
response is the longer one, the EOS rate of chosen responses, and the gold score of the
chosen responses. Over all pairs of a prompt's responses (no pair selection): each
reward's agreement as a ranker, the length rule's (``shorter``: the shorter response is the
better one; a judge that does not beat it knows nothing here beyond length) and the summed
reward's on the pairs where it goes against the length rule. Prints one JSON line and
writes ``self_labels.json``/``.md`` to --out.

    python benchmarks/self_labels.py --run runs/alignment/runs/spa --round 0 --out /tmp/sl
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK = ROOT / "jaxalign" / "data" / "instructions"


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("temperature",))
def token_stats(graphdef, policy, reference, ids, attention_mask, loss_mask, *, temperature):
    """Per-token ``ℓ_t`` and ``E_{q_t} ℓ_t`` over masked response tokens: ``[B, T]`` each.

    Token ``t`` is scored by the logits at ``t - 1``; ``q_t = softmax(policy logits / T)``.
    """
    from jaxalign.models.llama import positions_from_mask

    positions = positions_from_mask(attention_mask)

    def logits_of(params):
        model = nnx.merge(graphdef, params)
        hidden, _ = model.hidden_states(ids, positions, attention_mask)
        return model.logits(hidden).astype(jnp.float32)

    lp = jax.nn.log_softmax(logits_of(policy), axis=-1)[:, :-1]
    lr = jax.nn.log_softmax(logits_of(reference), axis=-1)[:, :-1]
    targets = ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    ratio = lp - lr  # [B, T-1, V]
    picked = jnp.take_along_axis(ratio, targets[..., None], axis=-1)[..., 0]
    q = jax.nn.softmax(lp * (1.0 / temperature), axis=-1)  # tempered π ∝ π^(1/T)
    expected = jnp.sum(q * ratio, axis=-1)
    return picked * mask, expected * mask


def score_responses(models, policy, entries, temperature: float, batch: int = 8):
    """Adds ``sum``/``mean``/``centered`` log-ratios (before β) to every sampled response."""
    tok = models.tokenizer
    rows = [(e, r) for e in entries for r in e["responses"]]
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        seqs = [e["prompt_ids"] + r["token_ids"] for e, r in chunk]
        width = 16
        while width < max(len(s) for s in seqs):
            width *= 2
        ids = np.full((batch, width), tok.pad_token_id, np.int32)
        attn = np.zeros((batch, width), np.int32)
        lmask = np.zeros((batch, width), np.int32)
        for i, ((e, _), s) in enumerate(zip(chunk, seqs, strict=True)):
            ids[i, : len(s)] = s
            attn[i, : len(s)] = 1
            lmask[i, len(e["prompt_ids"]) : len(s)] = 1
        picked, expected = token_stats(
            models.graphdef,
            policy,
            models.init_params,
            ids,
            attn,
            lmask,
            temperature=temperature,
        )
        picked, expected = np.asarray(picked, np.float64), np.asarray(expected, np.float64)
        for i, (_, r) in enumerate(chunk):
            n = max(len(r["token_ids"]), 1)
            r["logratio_sum"] = float(picked[i].sum())
            r["logratio_mean"] = float(picked[i].sum() / n)
            r["logratio_centered"] = float((picked[i] - expected[i]).sum())


def score_pool_responses(models, policy, entries, run: pathlib.Path) -> None:
    """Adds ``sum``/``mean`` log-ratios to every pool response with the chunked log-prob pass
    SPA's judge uses (:func:`jaxalign.scoring.response_logps`); ``centered`` needs every
    token's full distribution and is left out (NaN)."""
    from jaxalign import scoring
    from jaxalign.config import load_config

    saved = yaml.safe_load((run / "config.yaml").read_text())
    config = load_config(  # the settings that decide how responses are encoded and batched
        None,
        [
            f"data.{k}={saved['data'][k]}"
            for k in ("max_prompt_tokens", "max_response_tokens", "use_chat_template")
        ]
        + [f"train.{k}={saved['train'][k]}" for k in ("batch_size", "logp_chunk_size")],
    )
    records = []
    for e in entries:
        rs = e["responses"]
        for a in range(0, len(rs) - 1, 2):
            records.append(
                {
                    "prompt": e["prompt"],
                    "chosen": rs[a]["text"],
                    "rejected": rs[a + 1]["text"],
                    "chosen_ids": rs[a]["token_ids"],
                    "rejected_ids": rs[a + 1]["token_ids"],
                    "chosen_eos": rs[a]["finished"],
                    "rejected_eos": rs[a + 1]["finished"],
                }
            )
    tok = models.tokenizer
    both = [
        scoring.response_logps(models.graphdef, params, records, tok, config)
        for params in (policy, models.init_params)
    ]
    counts = scoring.response_token_counts(records, tok, config)
    k = 0
    for e in entries:
        rs = e["responses"]
        for a in range(0, len(rs) - 1, 2):
            for side, r in enumerate((rs[a], rs[a + 1])):
                ratio = float(both[0][k, side] - both[1][k, side])
                r["logratio_sum"] = ratio
                r["logratio_mean"] = ratio / max(int(counts[k, side]), 1)
                r["logratio_centered"] = float("nan")
            k += 1


def pool_entries(models, config: dict, pool: str, prompts: int) -> list[dict]:
    """The first ``prompts`` pool prompts among the run's round prompts, encoded as SPA does.

    A pool response is text: it is encoded the way a text pair is (an end-of-turn token
    when it finished), so its ids may differ from the sampler's where the text re-encodes
    differently; the judge's comparison is the same for both models.
    """
    from alignment import read_jsonl

    from jaxalign.generation import encode_prompts

    data = config["data"]
    rounds = {r["id"] for r in read_jsonl(pathlib.Path(data["prompts"]))}
    records = [r for r in read_jsonl(pathlib.Path(pool)) if r["id"] in rounds][:prompts]
    tok = models.tokenizer
    prompt_ids = encode_prompts(
        tok,
        [r["prompt"] for r in records],
        10**6,
        use_chat_template=data["use_chat_template"],
        max_prompt_tokens=data["max_prompt_tokens"],
    )
    entries = []
    for record, ids in zip(records, prompt_ids, strict=True):
        responses = [
            {
                "text": r["text"],
                "token_ids": tok.encode_response(r["text"], add_eos=r["finished"]),
                "finished": r["finished"],
                "gold": g,
            }
            for r, g in zip(record["responses"], record["gold"], strict=True)
        ]
        entries.append({**record, "prompt_ids": ids, "responses": responses})
    return entries


def candidate_entries(path: str) -> list[dict]:
    """A round's candidates (train prompts, exact sampled tokens), each response gold-scored."""
    from alignment import gold_scores, read_jsonl

    entries = []
    for record in read_jsonl(pathlib.Path(path)):
        texts = [r["text"] for r in record["responses"]]
        gold = gold_scores([record] * len(texts), texts)
        responses = [{**r, "gold": g} for r, g in zip(record["responses"], gold, strict=True)]
        entries.append({**record, "responses": responses})
    return entries


def _ranking_score(response: dict, reward: str) -> float:
    """What orders a prompt's responses: a reward's log-ratio, or ``shorter`` (minus the
    length in tokens: the rule that the shorter response is the better one)."""
    if reward == "shorter":
        return -len(response["token_ids"])
    return response[f"logratio_{reward}"]


def pairwise_agreement(entries, reward: str, against: str | None = None) -> dict:
    """Over every pair of a prompt's responses that gold separates: does the reward agree?

    The judge's accuracy as a ranker, without SPA's pair selection; the interval is a
    bootstrap over prompts (a prompt's pairs are not independent). ``reward="shorter"`` is
    the length rule, the baseline a judge has to beat to know more than length; with
    ``against="shorter"`` only the pairs where the reward and the length rule disagree
    count (how right the judge is where it goes against length).
    """
    per_prompt = []
    for e in entries:
        hits = []
        for a, b in itertools.combinations(e["responses"], 2):
            sa, sb = _ranking_score(a, reward), _ranking_score(b, reward)
            if a["gold"] == b["gold"] or sa == sb:
                continue
            if against is not None:
                oa, ob = _ranking_score(a, against), _ranking_score(b, against)
                if oa == ob or (oa > ob) == (sa > sb):
                    continue
            hits.append((sa > sb) == (a["gold"] > b["gold"]))
        if hits:
            per_prompt.append((sum(hits), len(hits)))
    name = reward if against is None else f"{reward}, against {against}"
    if not per_prompt:
        return {"reward": name, "pairs": 0, "agreement": None, "agreement_ci": None}
    hits, counts = np.asarray(per_prompt, np.float64).T
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(hits), size=(2000, len(hits)))
    boot = hits[draws].sum(1) / counts[draws].sum(1)
    return {
        "reward": name,
        "pairs": int(counts.sum()),
        "prompts": len(per_prompt),
        "agreement": float(hits.sum() / counts.sum()),
        "agreement_ci": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
    }


def evaluate_variant(entries, reward: str, pairing: str, truncated: str, beta: float) -> dict:
    from jaxalign.evaluation import paired_bootstrap
    from jaxalign.judging import Candidate, length_controlled_rewards, select_pair

    margins, agree, separated, longer, chosen_eos, chosen_gold = [], [], [], [], [], []
    skipped = 0
    groups = [e["responses"] if pairing == "best_worst" else e["responses"][:2] for e in entries]
    base = "sum" if reward == "regress" else reward
    all_rewards = [[beta * r[f"logratio_{base}"] for r in rs] for rs in groups]
    if reward == "regress":  # spa.length_control=regress: the summed reward less b·length
        all_rewards, _ = length_controlled_rewards(
            all_rewards,
            [[len(r["token_ids"]) for r in rs] for rs in groups],
            [[r["finished"] or truncated == "keep" for r in rs] for rs in groups],
        )
    for responses, rewards in zip(groups, all_rewards, strict=True):
        candidates = [Candidate(r["text"], r["finished"], len(r["token_ids"])) for r in responses]
        picked = select_pair(candidates, rewards, truncated)
        if isinstance(picked, str):
            skipped += 1
            continue
        i, j, _ = picked
        c, r = responses[i], responses[j]
        margins.append(rewards[i] - rewards[j])
        separated.append(c["gold"] != r["gold"])
        agree.append(c["gold"] > r["gold"])
        longer.append(len(c["token_ids"]) > len(r["token_ids"]))
        chosen_eos.append(c["finished"])
        chosen_gold.append(c["gold"])
    agree, separated = np.asarray(agree, bool), np.asarray(separated, bool)
    order = np.argsort(np.asarray(margins), kind="stable")
    terciles = []
    for part in np.array_split(order, 3):
        m = separated[part]
        terciles.append(float(agree[part][m].mean()) if m.any() else None)
    hits = agree[separated].astype(np.float64)
    return {
        "reward": reward,
        "pairing": pairing,
        "truncated": truncated,
        "pairs": len(margins),
        "skipped": skipped,
        "separated": int(separated.sum()),
        "agreement": float(hits.mean()) if hits.size else None,
        "agreement_ci": list(paired_bootstrap(hits, resamples=2000)) if hits.size else None,
        "agreement_by_margin_tercile": terciles,
        "chosen_longer": float(np.mean(longer)) if longer else None,
        "chosen_eos": float(np.mean(chosen_eos)) if chosen_eos else None,
        "chosen_gold": float(np.mean(chosen_gold)) if chosen_gold else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a jaxalign run directory")
    parser.add_argument("--round", type=int, default=0, help="the round whose model judges")
    parser.add_argument("--split", default="dev", choices=("train", "dev"))
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument(
        "--pool",
        help="judge a fixed set of responses instead of sampling from the round model: a "
        "benchmark pool (alignment.py's pool.jsonl, the SFT model's samples of the train "
        "prompts); the prompts judged are the run's round prompts (data.prompts), never its seed",
    )
    parser.add_argument(
        "--candidates",
        help="judge a round's own candidates instead (an SPA run's round_K/candidates.jsonl: "
        "π_{K-1}'s samples of round K's train prompts, with their exact tokens), to see how "
        "each judge labels the later rounds' samples",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from alignment import Models, gold_scores, read_jsonl

    from jaxalign import checkpoint
    from jaxalign.generation import encode_prompts, sample_texts
    from jaxalign.sampling import SamplingConfig

    run = pathlib.Path(args.run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    beta = config["train"]["beta"]
    temperature = config["sampling"]["temperature"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Models()
    state = json.loads((run / "state.json").read_text())
    model_dir = state["stages"][f"round_{args.round}/train"]["result"]["model"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), models.init_params)
    policy = checkpoint.load_params(model_dir, abstract)

    cache = out / "samples.jsonl"
    if cache.exists():
        entries = read_jsonl(cache)
    elif args.candidates:
        entries = candidate_entries(args.candidates)
        score_pool_responses(models, policy, entries, run)
        cache.write_text("".join(json.dumps(e) + "\n" for e in entries))
    elif args.pool:
        entries = pool_entries(models, config, args.pool, args.prompts)
        score_pool_responses(models, policy, entries, run)
        cache.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        records = read_jsonl(TASK / f"{args.split}.jsonl")[: args.prompts]
        tok = models.tokenizer
        sampling = SamplingConfig(
            n=args.samples,
            temperature=temperature,
            max_new_tokens=config["sampling"]["max_new_tokens"],
            eos_token_ids=tuple(tok.eos_token_ids),
            pad_token_id=tok.pad_token_id,
        )
        completions = sample_texts(
            nnx.merge(models.graphdef, policy),
            tok,
            [r["prompt"] for r in records],
            sampling,
            seed=11,
            batch_size=8,
            identities=[r["id"] for r in records],
        )
        prompt_ids = encode_prompts(tok, [r["prompt"] for r in records], 10**6)
        entries = []
        for record, ids, group in zip(records, prompt_ids, completions, strict=True):
            texts = [c.text for c in group]
            gold = gold_scores([record] * len(texts), texts)
            entries.append(
                {
                    **record,
                    "prompt_ids": ids,
                    "responses": [
                        {
                            "text": c.text,
                            "token_ids": c.token_ids,
                            "finished": c.finished,
                            "gold": g,
                        }
                        for c, g in zip(group, gold, strict=True)
                    ],
                }
            )
        score_responses(models, policy, entries, temperature)
        cache.write_text("".join(json.dumps(e) + "\n" for e in entries))

    fixed = bool(args.pool or args.candidates)  # no sampling distributions: no "centered"
    rewards = ("sum", "mean", "regress") if fixed else ("sum", "mean", "centered", "regress")
    variants = [
        evaluate_variant(entries, reward, pairing, truncated, beta)
        for reward, pairing, truncated in itertools.product(
            rewards, ("first_two", "best_worst"), ("keep", "skip", "reject")
        )
    ]
    responses = [r for e in entries for r in e["responses"]]
    result = {
        "benchmark": "self_labels",
        "run": str(run),
        "round": args.round,
        "split": "pool" if args.pool else "candidates" if args.candidates else args.split,
        "prompts": len(entries),
        "samples_per_prompt": args.samples,
        "samples_gold": float(np.mean([r["gold"] for r in responses])),
        "samples_eos": float(np.mean([r["finished"] for r in responses])),
        "variants": variants,
        "pairwise": [
            *(pairwise_agreement(entries, r) for r in rewards if r != "regress"),
            pairwise_agreement(entries, "shorter"),
            pairwise_agreement(entries, "sum", against="shorter"),
        ],
    }
    lines = [
        "| reward | pairing | truncated | pairs | separated | agreement [95% CI] | by margin "
        "tercile | chosen longer | chosen EOS | chosen gold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        ci = v["agreement_ci"] or [float("nan")] * 2
        terciles = " / ".join(
            "—" if t is None else f"{t:.2f}" for t in v["agreement_by_margin_tercile"]
        )
        lines.append(
            f"| {v['reward']} | {v['pairing']} | {v['truncated']} | {v['pairs']} | "
            f"{v['separated']} | {v['agreement'] or float('nan'):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
            f"{terciles} | {v['chosen_longer'] or 0:.2f} | {v['chosen_eos'] or 0:.2f} | "
            f"{v['chosen_gold'] or 0:.3f} |"
        )
    lines += [
        "",
        "| reward | separated pairs (all pairs of a prompt's responses) | agreement [95% CI] |",
        "|---|---|---|",
    ]
    for v in result["pairwise"]:
        ci = v["agreement_ci"] or [float("nan")] * 2
        lines.append(
            f"| {v['reward']} | {v['pairs']} | {v['agreement'] or float('nan'):.3f} "
            f"[{ci[0]:.3f}, {ci[1]:.3f}] |"
        )
    (out / "self_labels.json").write_text(json.dumps(result, indent=1))
    (out / "self_labels.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result))
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
