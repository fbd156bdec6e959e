"""PLE's stages against the paper's equations worked by hand: one iteration's scoring
stage (normalised rewards, the gap, τ_t = τ0·α^t, the route of every pair, which response
is chosen, the SFT weights) and its training stage's first step (RRHF's ranking hinge on
length-normalised log-probs plus the reward-weighted SFT loss, both conditioned on the plain
prompt x), from the model's full logits."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.algorithms import ple, stages
from jaxalign.algorithms.rounds import atomic_write_jsonl, read_jsonl
from jaxalign.config import load_config

# (plain response y, principle-guided y_p); the judge below scores a response by its "a"s.
RESPONSES = [
    ("aaaaa", "aaaaa b"),  # gap 0 -> SFT
    ("a", "aaaaaaaaaa"),  # gap +0.9 -> ranking, y_p chosen
    ("aaaaaaaa", "aa"),  # gap -0.6 -> ranking, y chosen
    ("aaa", "aaaa"),  # gap +0.1 -> SFT
    ("   ", "aaa"),  # an empty response -> skipped
    ("b", "ab"),  # gap +0.1 -> SFT (y weighted 0)
]
PROMPTS = ["Say a.", "Say it twice.", "Count.", "Hum.", "Sing.", "Go."]


def count_a_judge(prompts, responses, records, finished=None):
    return np.asarray([r.count("a") for r in responses], np.float64)


@pytest.fixture(scope="module")
def ctx(tiny_model_dir, tmp_path_factory):
    config = load_config(
        None,
        [
            "run.algorithm=ple",
            f"model.name={tiny_model_dir}",
            "data.use_chat_template=false",
            "data.max_prompt_tokens=24",
            "data.max_response_tokens=12",
            "train.batch_size=8",  # one batch holds every routed row
            "train.learning_rate=1e-3",
            "train.logp_chunk_size=16",
            "ple.lora_rank=2",
            "ple.sft_coefficient=0.5",
            "eval.enabled=false",
            "run.progress=false",
            "run.mesh.data=2",
            "run.mesh.fsdp=2",
            "run.mesh.tensor=2",
            f"run.output_dir={tmp_path_factory.mktemp('ple_stages') / 'run'}",
        ],
    )
    context, _ = stages.start_run(config, log=lambda m: None)
    return context


@pytest.fixture(scope="module")
def scored(ctx, tmp_path_factory):
    out = tmp_path_factory.mktemp("iteration")
    candidates = [
        {
            "id": f"q{i}",
            "prompt": prompt,
            "response": y,
            "principle_response": yp,
            "response_eos": i != 3,  # one cut response travels as such
            "principle_response_eos": True,
        }
        for i, (prompt, (y, yp)) in enumerate(zip(PROMPTS, RESPONSES, strict=True))
    ]
    atomic_write_jsonl(out / "candidates.jsonl", candidates)
    result = ple.score_stage(ctx, 2, count_a_judge, str(out / "candidates.jsonl"), out)
    return out, candidates, result


def test_scoring_routes_every_pair_as_the_paper_says(ctx, scored):
    out, candidates, result = scored
    raw = np.asarray([[y.count("a"), yp.count("a")] for y, yp in RESPONSES], np.float64)
    norm = (raw - raw.min()) / (raw.max() - raw.min())  # min-max over the iteration
    tau = 0.2 * 0.9**2  # τ_t = τ0·α^t, t = 2
    assert math.isclose(result["tau"], tau)
    rows = {r["id"]: r for r in read_jsonl(out / "scored.jsonl")}
    want_routes = ["sft", "ranking", "ranking", "sft", "skipped", "sft"]
    for i, route in enumerate(want_routes):
        row = rows[f"q{i}"]
        assert row["reward"] == raw[i, 0] and row["principle_reward"] == raw[i, 1]
        assert math.isclose(row["normalised"], norm[i, 0])
        assert math.isclose(row["gap"], norm[i, 1] - norm[i, 0], abs_tol=1e-12)
        assert row["route"] == route, (i, row)
    ranking = {r["id"]: r for r in read_jsonl(out / "ranking.jsonl")}
    assert set(ranking) == {"q1", "q2"}
    assert (ranking["q1"]["chosen"], ranking["q1"]["rejected"]) == ("aaaaaaaaaa", "a")
    assert (ranking["q2"]["chosen"], ranking["q2"]["rejected"]) == ("aaaaaaaa", "aa")
    assert all(r["prompt"] == PROMPTS[int(r["id"][1:])] for r in ranking.values())  # plain x
    sft = sorted(
        (r["id"], r["response"], r["eos"], r["weight"]) for r in read_jsonl(out / "sft.jsonl")
    )
    want_sft = sorted(
        (f"q{i}", text, eos, pytest.approx(w))
        for i in (0, 3, 5)
        for text, eos, w in (
            (RESPONSES[i][0], i != 3, norm[i, 0]),
            (RESPONSES[i][1], True, norm[i, 1]),
        )
    )
    assert sft == want_sft
    assert result["count/skipped_empty"] == 1 and result["count/ranking"] == 2
    # the stage's summary of the iteration, over every pair (the empty one's rewards too)
    gap = norm[:, 1] - norm[:, 0]
    assert result["count/considered"] == 6 and result["count/sft"] == 3
    assert result["ranking_fraction"] == pytest.approx(2 / 6)
    assert result["sft_fraction"] == pytest.approx(3 / 6)
    assert result["reward_mean_plain"] == pytest.approx(raw[:, 0].mean())
    assert result["reward_mean_principle"] == pytest.approx(raw[:, 1].mean())
    assert result["reward_std"] == pytest.approx(raw.std())
    assert result["gap_mean"] == pytest.approx(gap.mean())
    assert result["gap_abs_mean"] == pytest.approx(np.abs(gap).mean())
    assert result["ranking"] == str(out / "ranking.jsonl") and result["sft"] == str(
        out / "sft.jsonl"
    )


def _mean_logp(ctx, prompt: str, response: str, eos: bool) -> float:
    """The response's token-mean log-prob under the base model given the plain prompt, from
    the full logits of one unpadded forward pass, log-softmax in float64 numpy."""
    tok = ctx.tokenizer
    prompt_ids = tok.encode_prompt(prompt, use_chat_template=False)[-24:]
    response_ids = tok.encode_response(response, add_eos=eos)[:12]
    ids = jnp.asarray([prompt_ids + response_ids], jnp.int32)
    model = ctx.model(ctx.init_params)
    logits, _ = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))
    logits = np.asarray(logits[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    n = len(prompt_ids)
    picked = [logp[n - 1 + t, y] for t, y in enumerate(response_ids)]
    return float(np.mean(picked))


def test_the_first_training_step_is_the_papers_loss(ctx, scored, tmp_path):
    out, _, result = scored
    spec = ple._adapters(ctx)
    ple.train_stage(ctx, spec, 2, spec.init, result, tmp_path)
    ranking = read_jsonl(out / "ranking.jsonl")
    sft = read_jsonl(out / "sft.jsonl")
    # Adapters start at B = 0: the first step's policy is the base model.
    hinges = [
        max(
            0.0,
            -(
                _mean_logp(ctx, r["prompt"], r["chosen"], r["chosen_eos"])
                - _mean_logp(ctx, r["prompt"], r["rejected"], r["rejected_eos"])
            ),
        )
        for r in ranking
    ]
    weights = np.asarray([r["weight"] for r in sft])
    nll = np.asarray([-_mean_logp(ctx, r["prompt"], r["response"], r["eos"]) for r in sft])
    l_rank = float(np.mean(hinges))
    l_sft = float((weights * nll).sum() / weights.sum())
    steps = [
        json.loads(line)
        for line in ctx.metrics.path.read_text().splitlines()
        if json.loads(line).get("tag") == "round_2/train"
    ]
    first = min(steps, key=lambda m: m["step"])
    assert math.isclose(first["ple/ranking_loss"], l_rank, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(first["ple/sft_loss"], l_sft, rel_tol=1e-4)
    assert math.isclose(first["train/loss"], l_rank + 0.5 * l_sft, rel_tol=1e-4)
    assert first["ple/ranking_rows"] == 2 and first["ple/sft_rows"] == int((weights > 0).sum())


def test_each_iteration_takes_the_next_queries_and_wraps_around():
    prompts = [{"id": k} for k in range(5)]
    p = load_config(None, ["ple.prompts_per_iteration=2"]).ple
    ids = [[q["id"] for q in ple._queries(p, prompts, t)] for t in range(4)]
    assert ids == [[0, 1], [2, 3], [4, 0], [1, 2]]
    p = load_config(None, ["ple.prompts_per_iteration=7"]).ple  # more than there are: each once
    assert [q["id"] for q in ple._queries(p, prompts, 1)] == [2, 3, 4, 0, 1]
    p = load_config(None, ["ple.prompts_per_iteration=0"]).ple  # 0: all of them, every time
    assert [q["id"] for q in ple._queries(p, prompts, 3)] == [0, 1, 2, 3, 4]


def test_an_iteration_s_summary_row_reads_its_finished_stages(tmp_path):
    from jaxalign.algorithms.rounds import RoundRunner

    runner = RoundRunner(tmp_path / "run", {"run": {"seed": 1}}, log=lambda m: None)
    score = {
        "tau": 0.25,
        "count/considered": 8,
        "count/ranking": 4,
        "count/principle_better": 3,
        "ranking_fraction": 0.5,
        "sft_fraction": 0.375,
        "reward_mean_plain": 0.125,
        "reward_mean_principle": 0.75,
    }
    stage = {
        "round_0/score": score,
        "round_0/train": {"mean/train/loss": 1.5},
        "round_0/eval": {
            "win_rate": 0.5,
            "win_ci": [0.25, 0.75],
            "gold_score": 1.0,
            "mean_words": 9.0,
        },
        "round_1/score": {**score, "count/ranking": 0, "count/principle_better": 0},
    }
    runner.state["stages"] = {k: {"result": v, "seconds": 1.0} for k, v in stage.items()}
    assert ple._iteration_row(runner, 0) == {
        "iteration": 0,
        "tau": 0.25,
        "pairs": 8,
        "ranking_fraction": 0.5,
        "sft_fraction": 0.375,
        "principle_better": 0.75,
        "reward_plain": 0.125,
        "reward_principle": 0.75,
        "train_loss": 1.5,
        "win_rate": 0.5,
        "win_ci": "0.25-0.75",
        "gold_score": 1.0,
        "mean_words": 9.0,
    }
    row = ple._iteration_row(runner, 1)
    assert row["principle_better"] is None and "train_loss" not in row  # nothing ranked
    assert ple._iteration_row(runner, 2) == {"iteration": 2}
