"""kill -9 in the middle of a command, then the same command again: the artifacts are the
uninterrupted run's (scripts/chaos.py, with kills that land mid-run by construction)."""

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "chaos.py"


@pytest.fixture(scope="module")
def chaos():
    spec = importlib.util.spec_from_file_location("chaos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["chaos"]


def _lines(path: pathlib.Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_generate_killed_mid_file_resumes_to_the_same_file(chaos, tmp_path, tiny_model_dir):
    command = chaos.scenario_command("generate", tmp_path / "data", tiny_model_dir)

    def four_lines_written(out):
        return _lines(out / "samples.jsonl") >= 4

    report = chaos.chaos(command, tmp_path, triggers=[four_lines_written], env=chaos.scenario_env())
    assert report["kills_landed"] == 1, report["attempts"]
    assert 4 <= report["attempts"][0]["left_behind"]["lines"]["samples.jsonl"] < 64
    assert [a["end"] for a in report["attempts"]] == ["killed", "exit 0"]
    assert report["artifacts"] == {"samples.jsonl": "identical"}
    assert report["pass"]


def test_spa_killed_inside_a_train_stage_resumes_to_the_same_run(chaos, tmp_path, tiny_model_dir):
    """Killed after round 1's first train-state checkpoint (of 2 steps): the rerun resumes
    the stage from that step, and every artifact (pairs, eval files, refinement log, state,
    summary, report, the round's parameters and checkpoints, the exported model) is the
    uninterrupted run's."""
    command = chaos.scenario_command(
        "spa", tmp_path / "data", tiny_model_dir, ["train.batch_size=4"]
    )

    def round_1_checkpointed(out):
        return (out / "round_1" / "checkpoints" / "1" / "_CHECKPOINT_METADATA").is_file()

    report = chaos.chaos(
        command, tmp_path, triggers=[round_1_checkpointed], env=chaos.scenario_env()
    )
    assert report["kills_landed"] == 1, report["attempts"]
    left = report["attempts"][0]["left_behind"]
    assert left["last_stage"] == "round_1/judge"  # inside round 1's train stage
    assert left["checkpoint_steps"]["round_1/checkpoints"] == 1
    assert "resuming from step 1 of 2" in (tmp_path / "killed" / "log.txt").read_text()
    artifacts = report["artifacts"]
    for name in (
        "round_1/pairs.jsonl",
        "round_1/eval.jsonl",
        "round_1/refinement.jsonl",
        "round_1/model",
        "round_1/checkpoints",
        "round_1/model_hf/model.safetensors",
        "state.json",
        "summary.json",
        "metrics.jsonl",
        "report/report.md",
    ):
        assert artifacts[name] == "identical", name
    assert report["pass"], {k: v for k, v in artifacts.items() if v != "identical"}


def test_comparison_ignores_wall_times_and_relogged_steps_and_nothing_else(chaos, tmp_path):
    """What may differ between the runs (stage seconds, the steps a resumed stage logs again,
    the run folder's own path) does not count; a changed line or array does."""
    import json

    import numpy as np

    from jaxalign import checkpoint

    def write_run(out, seconds, metrics, weight):
        out.mkdir(parents=True)
        decoding = {  # the counts are the run's; the seconds and rates the machine's
            "sampled_tokens": 30,
            "decoded_tokens": 48,
            "decode_seconds": seconds,
            "sampled_tokens_per_second": 30 / seconds,
            "decoded_tokens_per_second": 48 / seconds,
        }
        stages = {
            "round_0/train": {"result": {"model": str(out / "model")}, "seconds": seconds},
            "round_0/sample": {"result": {}, "seconds": seconds, "decoding": decoding},
        }
        (out / "state.json").write_text(json.dumps({"stages": stages}))
        (out / "pairs.jsonl").write_text('{"id": 1, "margin": 0.5}\n')
        rows = [{"tag": "train", "step": s, "loss": loss} for s, loss in metrics]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        checkpoint.save_params(out / "model", {"w": np.full((2, 3), weight, np.float32)})

    reference, killed = tmp_path / "reference" / "out", tmp_path / "killed" / "out"
    write_run(reference, 1.5, [(1, 0.7), (2, 0.6)], 1.0)
    write_run(killed, 9.25, [(1, 0.7), (2, 0.9), (2, 0.6)], 1.0)  # step 2 logged again
    results, debris = chaos.compare_outputs(reference, killed)
    assert results == dict.fromkeys(
        ["metrics.jsonl", "model", "pairs.jsonl", "state.json"], "identical"
    )
    assert debris == []

    (killed / "pairs.jsonl").write_text('{"id": 1, "margin": 0.25}\n')
    (killed / ".state.json.x1.tmp").write_text("{")  # a kill before the rename
    checkpoint.save_params(killed / "model", {"w": np.full((2, 3), 2.0, np.float32)})
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"tag": "train", "step": 2, "loss": 0.5}) + "\n")
    results, debris = chaos.compare_outputs(reference, killed)
    assert results["pairs.jsonl"] == "differs: content"
    assert results["model"] == "differs: arrays [\"['w']\"]"
    assert results["metrics.jsonl"] == "differs: rows [('train', 2)]"
    assert results["state.json"] == "identical" and debris == [".state.json.x1.tmp"]

    state = json.loads((killed / "state.json").read_text())
    state["stages"]["round_0/sample"]["decoding"]["decoded_tokens"] = 64  # a count, compared
    (killed / "state.json").write_text(json.dumps(state))
    results, _ = chaos.compare_outputs(reference, killed)
    assert results["state.json"].startswith("differs")
