"""SPA end to end on a tiny random model: artifacts, summary, and resume after a crash."""

import json
import pathlib

import numpy as np
import pytest
from small_spa import small_spa_overrides

from jaxalign.algorithms import spa
from jaxalign.config import load_config
from jaxalign.data.records import DEMO_FILES


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_model_dir):
    """The tiny model, and small slices of the demo data."""
    root = tmp_path_factory.mktemp("spa")
    (root / "model").symlink_to(tiny_model_dir)
    seeds = DEMO_FILES["pairs"].read_text().splitlines()[:8]
    (root / "seed.jsonl").write_text("\n".join(seeds) + "\n")
    prompts = DEMO_FILES["prompts"].read_text().splitlines()[:8]
    (root / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    evals = DEMO_FILES["eval"].read_text().splitlines()[:4]
    (root / "eval.jsonl").write_text("\n".join(evals) + "\n")
    return root


def _config(root: pathlib.Path, out: pathlib.Path, *extra):
    return load_config(
        None,
        [
            *small_spa_overrides(
                root / "model",
                root / "seed.jsonl",
                root / "prompts.jsonl",
                root / "eval.jsonl",
                out,
            ),
            *extra,
        ],
    )


def _outputs(out: pathlib.Path):
    pairs = (out / "round_1" / "pairs.jsonl").read_text()
    evals = (out / "round_1" / "eval.jsonl").read_text()
    summary = json.loads((out / "summary.json").read_text())["rounds"]
    return pairs, evals, summary


@pytest.fixture(scope="module")
def uninterrupted(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "spa"
    spa.run(_config(tiny_setup, out), log=lambda m: None)
    return out


def test_run_writes_every_artifact_and_a_summary(uninterrupted):
    out = uninterrupted
    for name in ("config.yaml", "state.json", "metrics.jsonl", "summary.md", "baseline_eval.jsonl"):
        assert (out / name).is_file(), name
    for rel in ("round_0/model", "round_1/model", "round_1/candidates.jsonl"):
        assert (out / rel).exists(), rel
    candidates = [
        json.loads(x) for x in (out / "round_1/candidates.jsonl").read_text().splitlines()
    ]
    assert len(candidates) == 8 and all(len(c["responses"]) == 2 for c in candidates)
    pairs, _, summary = _outputs(out)
    state = json.loads((out / "state.json").read_text())
    judge = state["stages"]["round_1/judge"]["result"]
    records = [json.loads(x) for x in pairs.splitlines()]
    assert (
        judge["count/considered"]
        == 8
        == judge["count/kept"]
        + sum(judge[f"count/{k}"] for k in ("identical", "empty", "truncated", "tied"))
    )
    assert len(records) == judge["count/kept"]
    for r in records:
        assert r["margin"] > 0 and r["reward_chosen"] > r["reward_rejected"]
        np.testing.assert_allclose(r["p"], 1 / (1 + np.exp(-r["margin"])), rtol=1e-9)
    assert [row["round"] for row in summary] == ["SFT", 0, 1]
    md = (out / "summary.md").read_text()
    assert md.startswith("# SPA run summary\n\n") and "win rate vs SFT" in md
    tags = {json.loads(x)["tag"] for x in (out / "metrics.jsonl").read_text().splitlines()}
    assert tags == {"round_0/train", "round_1/train"}
    train1 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("spa/flagged_fraction" in m for m in train1 if m["tag"] == "round_1/train")


def test_rerun_of_a_finished_run_redoes_nothing(tiny_setup, uninterrupted):
    before = json.loads((uninterrupted / "state.json").read_text())
    spa.run(_config(tiny_setup, uninterrupted), log=lambda m: None)
    after = json.loads((uninterrupted / "state.json").read_text())
    assert after["stages"] == before["stages"]


def test_resume_refuses_a_changed_config(tiny_setup, uninterrupted):
    with pytest.raises(ValueError, match="spa.smoothing_alpha"):
        spa.run(_config(tiny_setup, uninterrupted, "spa.smoothing_alpha=0.3"), log=print)


def _crash_after(monkeypatch, stage_fn_name):
    original = getattr(spa, stage_fn_name)

    def crashing(*args, **kwargs):
        original(*args, **kwargs)  # the work is done and written; the process dies before
        raise KeyboardInterrupt("simulated kill")  # the stage is recorded as finished

    monkeypatch.setattr(spa, stage_fn_name, crashing)


STAGES = ["train_stage", "sample_stage", "judge_stage", "eval_stage"]


@pytest.mark.parametrize(
    "stage",
    [pytest.param(s, marks=[] if s == "judge_stage" else pytest.mark.slow) for s in STAGES],
)
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    tiny_setup, uninterrupted, tmp_path, monkeypatch, stage
):
    out = tmp_path / "spa"
    with monkeypatch.context() as m:
        _crash_after(m, stage)
        with pytest.raises(KeyboardInterrupt):
            spa.run(_config(tiny_setup, out), log=lambda msg: None)
    state_path = out / "state.json"  # absent when the very first stage was cut off
    before = json.loads(state_path.read_text())["stages"] if state_path.exists() else {}
    spa.run(_config(tiny_setup, out), log=lambda msg: None)
    after = json.loads((out / "state.json").read_text())["stages"]
    for key, entry in before.items():  # finished stages were not redone
        assert after[key] == entry
    assert len(after) > len(before)
    assert _outputs(out)[:2] == _outputs(uninterrupted)[:2]


def test_a_held_out_share_of_the_seed_checks_the_judge_and_trains_nothing(tiny_setup, tmp_path):
    """``spa.seed_holdout``: round 0 trains on the other seed pairs, then π_0 scores the held
    out ones in ``round_0/judge_check``, and the log names the result."""
    from jaxalign.data.records import read_preference_records

    out = tmp_path / "spa"
    logs = []
    extra = ("spa.rounds=0", "spa.seed_holdout=0.25", "eval.enabled=false")
    spa.run(_config(tiny_setup, out, *extra), log=logs.append)
    seeds, _ = read_preference_records(str(tiny_setup / "seed.jsonl"), "error")
    train, held = spa.split_seed_pairs(seeds, 0.25)
    assert (len(train), len(held)) == (6, 2)
    stages = json.loads((out / "state.json").read_text())["stages"]
    assert stages["round_0/train"]["result"]["pairs"] == 6
    check = stages["round_0/judge_check"]["result"]
    rows = [json.loads(x) for x in (out / "round_0" / "judge_check.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p.get("id") for p in held if p["chosen"] != p["rejected"]]
    assert check["pairs"] == len(rows)
    right = [r["reward_chosen"] > r["reward_rejected"] for r in rows]
    assert check["judge_agreement"] == pytest.approx(sum(right) / len(rows))
    assert any("judge check on 2 held-out seed pairs" in m for m in logs)
    assert any("2 of 8 seed pairs held out of round 0" in m for m in logs)
