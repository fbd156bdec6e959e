"""Run reports on a synthetic run directory; metrics and summary helpers."""

import base64
import json
import re

import numpy as np
import pytest

from jaxalign import report
from jaxalign.report import (
    format_table,
    load_run,
    read_metrics,
    stage_results,
    step_series,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _state(run, stages):
    run.mkdir(parents=True, exist_ok=True)
    body = {"stages": {k: {"result": v, "seconds": 1.5} for k, v in stages.items()}}
    (run / "state.json").write_text(json.dumps(body), encoding="utf-8")


def _eval_result(rate, lo, hi, n=8):
    wins = int(rate * n)
    return {"win_rate": rate, "win_ci": [lo, hi], "wins": wins, "ties": 0, "losses": n - wins}


def _metrics(tag, losses, margins, flagged=None):
    out = []
    for step, (loss, margin) in enumerate(zip(losses, margins, strict=True), 1):
        r = {"tag": tag, "step": step, "train/loss": loss, "rewards/margin": margin}
        if flagged is not None:
            r["spa/flagged_fraction"] = flagged
        out.append(r)
    return out


@pytest.fixture
def finished_run(tmp_path):
    """A two-round SPA run as ``jaxalign run`` leaves it, with made-up numbers."""
    run = tmp_path / "run"
    _state(
        run,
        {
            "round_0/train": {"pairs": 16, "final/rewards/margin": 1.2},
            "round_0/eval": _eval_result(0.625, 0.3, 0.95),
            "round_1/sample": {"prompts": 8},
            "round_1/judge": {"count/kept": 6, "gold_agreement": 0.75, "margin_mean": 0.4},
            "round_1/train": {"mean/spa/flagged_fraction": 0.125},
            "round_1/eval": _eval_result(0.75, 0.45, 1.0),
            "round_2/sample": {"prompts": 8},
            "round_2/judge": {"count/kept": 7, "gold_agreement": 0.5},
            "round_2/train": {"mean/spa/flagged_fraction": 0.25},
            "round_2/eval": _eval_result(0.875, 0.6, 1.0),
        },
    )
    rows = _metrics("round_0/train", [0.69, 0.5, 0.3], [0.0, 0.8, 1.5])
    rows += _metrics("round_1/train", [0.7, 0.65], [0.01, 0.1], flagged=0.0)
    rows += _metrics("round_2/train", [0.69, 0.6], [0.0, 0.2], flagged=0.5)
    _jsonl(run / "metrics.jsonl", rows)
    rng = np.random.default_rng(0)
    for i, n in ((1, 6), (2, 7)):
        _jsonl(
            run / f"round_{i}" / "pairs.jsonl",
            [
                {"id": f"p{k}", "margin": float(m), "p": 0.6}
                for k, m in enumerate(rng.gamma(2, 0.2, n))
            ],
        )
    _jsonl(
        run / "round_2" / "eval.jsonl",
        [
            {
                "id": "e0",
                "prompt": "Opposite of <hot>?",
                "response": "cold",
                "finished": True,
                "score": 2.0,
                "baseline": "warm",
                "baseline_score": 0.0,
            },
        ],
    )
    summary = {"rounds": [{"round": "SFT", "win_rate": 0.5}, {"round": 0, "win_rate": 0.625}]}
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (run / "config.yaml").write_text("spa:\n  rounds: 2\n", encoding="utf-8")
    return run


def test_report_of_a_finished_run_has_every_plot(finished_run):
    path = write_report(finished_run)
    out = finished_run / "report"
    assert path == out / "report.html"
    names = [
        "win_rate.png",
        "gold_agreement.png",
        "flagged_fraction.png",
        "margins.png",
        "training.png",
    ]
    for name in names:
        payload = (out / name).read_bytes()
        assert payload.startswith(PNG_MAGIC) and len(payload) > 5000, name
    page = path.read_text(encoding="utf-8")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(names)
    assert all(base64.b64decode(x).startswith(PNG_MAGIC) for x in images)
    # Each series is named with its numbers, round by round.
    for text in [
        "round 0: 0.625 [0.300, 0.950] (n=8)",
        "round 1: 0.750 [0.450, 1.000]",
        "round 2: 0.875 [0.600, 1.000]",
        "round 1: 0.750; round 2: 0.500",  # gold agreement
        "round 1: 0.125; round 2: 0.250",  # flagged fraction
        "round 1: n=6, mean",
        "round 2: n=7, mean",
        "round_0/train: 3 steps, loss 0.690 → 0.300, reward margin 0.000 → 1.500",
        "round_1/train: 2 steps",
        "round_2/train: 2 steps, loss 0.690 → 0.600",
        "Opposite of &lt;hot&gt;?",  # escaped example from eval.jsonl
        "round_2/eval",  # stage times
        "rounds: 2",  # config
    ]:
        assert text in page, text
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert all(f"]({name})" in markdown for name in names)
    assert "| round | win rate vs SFT |" in markdown


def test_report_of_a_run_on_gs(finished_run, gcs_bucket):
    """A run directory in a bucket: read through etils.epath, the report written beside it."""
    from etils import epath

    url = f"gs://bucket/runs/{finished_run.name}"
    remote = epath.Path(url)
    for path in finished_run.rglob("*"):
        if path.is_file():
            target = remote / path.relative_to(finished_run).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    page = write_report(url).read_text()
    local = write_report(finished_run, finished_run / "local_report").read_text(encoding="utf-8")
    prefix = f"runs/{finished_run.name}/report"
    assert f"{prefix}/report.html" in gcs_bucket.names()
    assert gcs_bucket.read(f"{prefix}/margins.png").startswith(PNG_MAGIC)
    strip = re.compile(r"src='data:image/png;base64,[^']+'")  # PNG bytes may differ by run path
    assert strip.sub("", page).replace(url, "RUN") == strip.sub("", local).replace(
        str(finished_run), "RUN"
    )
    assert read_metrics(f"{url}/metrics.jsonl") == read_metrics(finished_run / "metrics.jsonl")


def test_report_of_a_partial_run_plots_what_exists(tmp_path):
    run = tmp_path / "partial"
    _state(run, {"round_0/train": {"pairs": 4}})
    _jsonl(run / "metrics.jsonl", _metrics("round_0/train", [0.69, 0.6], [0.0, 0.3]))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"tag": "round_0/train", "st')  # torn by a kill
    path = write_report(run, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.html",
        "report.md",
        "training.png",
    ]
    assert "round_0/train: 2 steps" in path.read_text(encoding="utf-8")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Nothing to plot yet" in write_report(empty).read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="not found"):
        write_report(tmp_path / "nowhere")


def test_only_process_zero_writes(finished_run, monkeypatch):
    monkeypatch.setattr(report.jax, "process_index", lambda: 1)
    path = write_report(finished_run)
    assert path == finished_run / "report" / "report.html" and not path.parent.exists()


def test_report_command(finished_run, capsys):
    from jaxalign.cli import main

    assert main(["report", str(finished_run), "--out", str(finished_run / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(finished_run / "r" / "report.html")
    assert main(["report", str(finished_run / "missing")]) == 1


def test_stage_results_and_step_series_by_hand(tmp_path):
    state = {
        "stages": {
            "round_1/judge": {"result": {"gold_agreement": 0.5}},
            "round_0/train": {"result": {"pairs": 3}},
            "other": {"result": {}},
        }
    }
    assert stage_results(state) == {
        0: {"train": {"pairs": 3}},
        1: {"judge": {"gold_agreement": 0.5}},
    }
    records = [
        {"tag": "a", "step": 1, "loss": 3.0},
        {"tag": "a", "step": 2, "loss": 2.0},
        {"tag": "a", "step": 2, "loss": 1.0},  # the step again after a resume
        {"tag": "b", "step": 1, "loss": 5.0, "x": True},
        {"tag": "b", "step": 2},
    ]
    assert step_series(records, "loss") == {"a": ([1, 2], [3.0, 1.0]), "b": ([1], [5.0])}
    assert step_series(records, "x") == {}
    _jsonl(tmp_path / "metrics.jsonl", records)
    assert read_metrics(tmp_path / "metrics.jsonl") == records
    data = load_run(tmp_path)
    assert data.rounds == {} and data.summary_rows == [] and len(data.metrics) == 5


def test_format_table():
    table = format_table(
        [{"a": 1, "b": 0.12345}, {"a": None, "b": float("nan")}], [("a", "A"), ("b", "B")]
    )
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1 | 0.123 |", "| - | - |"]
