"""The benchmarks' own behaviour (not their timings): a missing peer stops the benchmark
with the install command instead of timing something else."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_train_step_without_trl_names_the_install_command(tmp_path):
    (tmp_path / "trl.py").write_text("raise ImportError('no module named trl (simulated)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--steps", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode != 0
    assert 'pip install -e ".[bench]"' in done.stderr and "--peer torch" in done.stderr
    assert not done.stdout.strip()  # no JSON: nothing was timed against another peer


def test_cpu_description_names_the_model_and_l3():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from machine import cpu_description
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    described = cpu_description()
    assert isinstance(described, dict)
    if shutil.which("lscpu"):
        assert described.get("model")


def test_plan_compiles_a_1b_step_and_fsdp_divides_its_parameter_bytes():
    """benchmarks/plan.py on a ~1B-parameter shape (TinyLlama's) on the suite's 8 fake
    devices: the DPO step compiles from abstract shapes, and FSDP over 8 devices holds
    at most 1/7 of the parameter and optimizer bytes per device that one device holds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import plan
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from jaxalign.config import load_config

    config = load_config(
        str(ROOT / "configs" / "spa_zephyr7b_ultrafeedback.yaml"),
        ["data.max_prompt_tokens=64", "data.max_response_tokens=64", "train.batch_size=8"],
    )
    cfg = plan.model_config(config, "llama-1b")
    one = plan.plan_programs(config, cfg, 1, ["train_dpo"])["train_dpo"]
    eight = plan.plan_programs(config, cfg, 8, ["train_dpo"])["train_dpo"]
    n = 1_100_048_384  # TinyLlama-1.1B's parameters
    assert 0.95 * 12 * n < one["arguments"] < 1.1 * 12 * n  # float32 weights + Adam's m, v
    assert one["arguments"] / eight["arguments"] >= 7
    assert eight["flops"] > 0 and eight["peak"] >= eight["arguments"]


def test_alignment_arms_run_the_papers_spa_settings_whatever_the_base_config():
    """``jaxalign run`` starts from the demo config (``spa.judge_reward: mean``); the quality
    benchmark's arms must still be the paper's SPA, with only their own options on top."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import alignment
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import dataclasses

    from jaxalign.config import SPAConfig, load_config

    settings = alignment.Settings()
    data = {
        "files": {k: f"/data/{k}.jsonl" for k in ("seed_pairs", "round_prompts", "all_pairs")},
        "prompts_per_round": [4, 8, 12],
    }
    run_dir = pathlib.Path("/tmp/arm")
    extra = {"mine": "spa.samples_per_prompt=4 spa.judge_policy=seed"}
    paper = load_config(None, alignment.arm_overrides("spa", settings, data, run_dir, extra))
    mine = load_config(None, alignment.arm_overrides("mine", settings, data, run_dir, extra))
    sized = {"prompts_per_round", "seed_epochs", "round_epochs", "rounds"}
    for field in dataclasses.fields(SPAConfig):
        if field.name in sized:
            continue
        assert getattr(paper.spa, field.name) == getattr(SPAConfig(), field.name), field.name
    assert paper.spa.judge_reward == "sum" and paper.spa.prompts_per_round == (4, 8, 12)
    assert (mine.spa.samples_per_prompt, mine.spa.judge_policy) == (4, "seed")
    assert mine.spa.judge_reward == "sum" and mine.spa.truncated_policy == "keep"


def test_alignment_pool_prompts_keep_the_seed_size_of_the_whole_train_split(tmp_path):
    """``--pool-prompts N`` labels only the first N train prompts: the seed is still
    ``seed_fraction`` of the whole split, the round prompts are the rest of the N, and
    dpo_all's pairs are the gold pairs of all N (every prompt SPA sees)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import alignment
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    settings = alignment.Settings(train_prompts=200, seed_fraction=0.03, pool_prompts=20)
    pool = [
        {
            "id": f"t{k}",
            "prompt": f"prompt {k}",
            "constraints": [],
            "responses": [
                {"text": f"a{k}", "finished": True},
                {"text": f"b{k}", "finished": False},
            ],
            "gold": [1.0, 0.5] if k % 4 else [0.5, 0.5],  # every fourth prompt ties
        }
        for k in range(20)
    ]
    data = alignment.data_step(tmp_path, settings, pool)
    assert data["counts"] == {
        "seed_pairs": 4,
        "all_pairs": 15,
        "round_prompts": 14,
        "seed_prompts": 6,
    }
    seed = alignment.read_jsonl(pathlib.Path(data["files"]["seed_pairs"]))
    assert [p["id"] for p in seed] == ["t1", "t2", "t3", "t5"]  # round(0.03 · 200) = 6 prompts
    assert all(p["chosen"].startswith("a") for p in seed)
    assert data["prompts_per_round"] == [1, 4, 9]  # 14 split 8 : 20 : 30, the rest to the last
    with pytest.raises(SystemExit, match="leaves no round prompts"):
        alignment.data_step(tmp_path / "small", settings, pool[:6])


def test_alignment_constraint_rates_count_each_sample_against_each_constraint():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import alignment
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    records = {
        "e0": {"id": "e0", "constraints": [{"type": "no_comma"}, {"type": "max_words", "n": 3}]},
        "e1": {"id": "e1", "constraints": [{"type": "no_comma"}]},
    }
    rows = [
        {"id": "e0", "samples": [{"text": "a b"}, {"text": "a, b"}, {"text": "a b, c d"}]},
        {"id": "e1", "samples": [{"text": "x y z"}]},
    ]
    rates = alignment.constraint_rates(rows, records)
    # no_comma: yes, no, no (e0) and yes (e1) = 2/4; fewer than 3 words: yes, yes, no = 2/3
    assert rates == {"max_words": 2 / 3, "no_comma": 0.5}


def test_self_labels_length_rule_and_the_judge_against_it_count_gold_separated_pairs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import self_labels
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def response(tokens, gold, reward):
        return {"token_ids": [7] * tokens, "gold": gold, "logratio_sum": reward}

    entries = [
        # pairs (a,b), (a,c), (b,c); gold separates (a,b) and (a,c) only
        {"responses": [response(5, 1.0, 0.1), response(9, 0.0, 0.3), response(2, 0.0, 0.2)]},
        # gold prefers the longer one; the judge prefers it too
        {"responses": [response(3, 0.0, -1.0), response(8, 1.0, 2.0)]},
    ]
    shorter = self_labels.pairwise_agreement(entries, "shorter")
    # (a,b): a shorter and better, right; (a,c): c shorter, a better, wrong; prompt 2: wrong
    assert (shorter["pairs"], shorter["agreement"]) == (3, 1 / 3)
    judge = self_labels.pairwise_agreement(entries, "sum")
    # (a,b): b higher, wrong; (a,c): c higher, wrong; prompt 2: right
    assert (judge["pairs"], judge["agreement"]) == (3, 1 / 3)
    against = self_labels.pairwise_agreement(entries, "sum", against="shorter")
    # where the judge and the length rule disagree: (a,b) (wrong) and prompt 2 (right)
    assert against["reward"] == "sum, against shorter"
    assert (against["pairs"], against["agreement"]) == (2, 0.5)


def test_profile_table_counts_each_matmuls_flops_from_the_compiled_hlo():
    """benchmarks/profile_step.py joins a trace's ops with the compiled HLO: a jitted
    ``tanh(a @ b) @ c.T`` has matmuls of exactly 2·m·k·n and 2·m·n·p FLOPs, and its traced
    ops (each timed once per call) carry those FLOPs in the table."""
    import tempfile

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    m, k, n, p = 96, 64, 160, 48
    f = jax.jit(lambda a, b, c: jnp.tanh(a @ b) @ c.T)
    args = (jnp.ones((m, k)), jnp.ones((k, n)), jnp.ones((p, n)))
    compiled = f.lower(*args).compile()
    instructions, computations = profile_step.parse_hlo(compiled.as_text())
    flops = [
        profile_step.op_flops(name, instructions, computations) for name in computations["ENTRY"]
    ]
    assert sorted(x for x in flops if x) == sorted([2.0 * m * k * n, 2.0 * m * n * p])
    f(*args).block_until_ready()
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            for _ in range(3):
                f(*args).block_until_ready()
        events = profile_step.profile_events(trace)
    rows, kinds = profile_step.op_table(events, compiled.as_text(), steps=3)
    matmul = next(r for r in kinds if r["kind"] == "matmul")
    assert matmul["seconds_per_step"] > 0
    counted = sum(r["gflops"] * r["seconds_per_step"] for r in rows if r["kind"] == "matmul")
    assert abs(counted * 1e9 - 2.0 * m * n * (k + p)) < 1e-3 * m * n * (k + p)
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9


def test_profile_splits_the_time_ops_share_evenly_among_them():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from profile_step import split_overlaps
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # a: 0-4 s alone for 0-1, with b for 1-3 (b: 1-3), alone 3-4; c: 5-6 alone.
    spans = [(0, 4e9, "a"), (1e9, 3e9, "b"), (5e9, 6e9, "c")]
    assert split_overlaps(spans) == [("a", 3.0), ("b", 1.0), ("c", 1.0)]


def test_profile_spa_program_runs_the_refinement_step():
    """``profile_step.py --program spa`` builds SPA's refinement step (reference in the step,
    extrapolated logits) on the demo round's row shapes and runs it."""
    import math

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from jaxalign.models.llama import ModelConfig

    config = ModelConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=1, tie_embeddings=True,
    )  # fmt: skip
    run, compiled, compile_s = profile_step.spa_program(config, pairs=2, length=128, chunk=64)
    assert compile_s > 0 and "sort" in compiled.as_text()  # the scored positions' compaction
    first, second = run(), run()
    assert math.isfinite(float(first["train/loss"]))
    assert "spa/extrapolated_margin" in first
    assert float(second["train/loss"]) != float(first["train/loss"])  # the policy moved


def test_spa_round_reads_the_refinement_steps_throughput_from_the_metrics(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from spa_round import train_perf
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import json

    rows = [
        {"tag": "round_0/train", "perf/step_seconds": 9.0, "perf/model_tflops_per_second": 1.0},
        {"tag": "round_1/train", "step": 1},  # a row without throughput: left out
        # peak 0.5 TFLOP/s: 0.2 of it for 4 s (compiling), then 0.4 for 1 s and 0.3 for 2 s
        {"tag": "round_1/train", "perf/step_seconds": 4.0, "perf/model_tflops_per_second": 0.1,
         "perf/mfu": 0.2},
        {"tag": "round_1/train", "perf/step_seconds": 1.0, "perf/model_tflops_per_second": 0.2,
         "perf/mfu": 0.4},
        {"tag": "round_1/train", "perf/step_seconds": 2.0, "perf/model_tflops_per_second": 0.15,
         "perf/mfu": 0.3},
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    perf = train_perf(path, "round_1/train")
    assert perf["step_seconds"] == [4.0, 1.0, 2.0] and perf["step_mfu"] == [0.2, 0.4, 0.3]
    assert perf["peak_tflops_per_second"] == 0.5
    assert perf["mfu"] == round((0.4 + 0.2 + 0.3) / 7 / 0.5, 3)
    assert perf["mfu_after_first"] == round((0.2 + 0.3) / 3 / 0.5, 3)
    assert train_perf(path, "round_2/train") == {}
