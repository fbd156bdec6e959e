"""Metrics logging, round summaries and the run report.

``MetricsWriter`` appends one JSON object per logged step to ``metrics.jsonl``
(and to TensorBoard when ``tensorboardX`` is installed); on a multi-host run
only process 0 writes. ``format_table`` renders the end-of-run round summary.
``write_report`` turns a run directory into ``report/report.html`` (plots
embedded as base64 PNG), ``report/report.md`` and the PNGs (matplotlib, Agg).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class MetricsWriter:
    """Appends ``{"tag": ..., "step": ..., **scalars}`` lines to a JSONL file.

    A ``gs://`` (or other URL) path cannot be appended to; there the whole object
    is rewritten, through ``etils.epath``, with every line so far.
    """

    def __init__(self, path: str | os.PathLike, tensorboard_dir: str | None = None):
        self.remote = _remote(path)
        self.path = _path(path)
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._lines: list[str] = []
        if self.enabled and self.remote and self.path.exists():
            self._lines = self.path.read_text().splitlines(keepends=True)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    SummaryWriter = None
                if SummaryWriter is not None:
                    self._tb = SummaryWriter(tensorboard_dir)

    def write(self, tag: str, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"tag": tag, "step": int(step)}
        record.update({k: _plain(v) for k, v in scalars.items()})
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(f"{tag}/{k}", v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an object-store URL (``gs://...``) or an ``epath.Path``."""
    return isinstance(path, epath.Path) or "://" in os.fspath(path)


def _path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
    """``pathlib.Path`` locally, ``etils.epath.Path`` for ``gs://`` and other URLs."""
    return epath.Path(path) if _remote(path) else pathlib.Path(path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = _path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns = [(key, header), ...]``."""
    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])


# ----------------------------------------------------------------------------- run report
#
# ``write_report(run_dir)`` reads what a run directory holds (state.json, metrics.jsonl,
# summary.json, round_i/pairs.jsonl, round_i/eval.jsonl) and writes ``report/``:
# PNG plots, ``report.md`` linking them and ``report.html`` with them embedded.
# Every plot is drawn from what exists, so a partial run gets a partial report.

_STAGE_KEY = re.compile(r"^round_(\d+)/(\w+)$")
REPORT_DIR = "report"


def _read_jsonl_lenient(path: pathlib.Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a run killed mid-write) is ignored."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


def stage_results(state: Mapping[str, Any]) -> dict[int, dict[str, dict]]:
    """``{round: {stage: result}}`` from a run's ``state.json`` contents."""
    rounds: dict[int, dict[str, dict]] = {}
    for key, entry in state.get("stages", {}).items():
        match = _STAGE_KEY.match(key)
        if match and isinstance(entry, Mapping):
            rounds.setdefault(int(match.group(1)), {})[match.group(2)] = entry.get("result", {})
    return dict(sorted(rounds.items()))


def step_series(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, tuple[list, list]]:
    """``{tag: (steps, values)}`` of one metric; a step logged twice (a resumed stage)
    keeps its last value."""
    by_tag: dict[str, dict[int, float]] = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and "step" in r:
            by_tag.setdefault(str(r.get("tag")), {})[int(r["step"])] = float(value)
    return {tag: (sorted(d), [d[s] for s in sorted(d)]) for tag, d in by_tag.items()}


@dataclasses.dataclass
class RunData:
    """What a report is drawn from; every part may be empty."""

    run_dir: pathlib.Path | epath.Path
    rounds: dict[int, dict[str, dict]]  # round -> stage -> result
    metrics: list[dict]
    summary_rows: list[dict]
    stage_seconds: dict[str, float]
    margins: dict[int, list[float]]  # round -> judged margins of its pairs
    eval_records: dict[int, list[dict]]  # round -> eval.jsonl records
    config_text: str


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Reads a run directory; missing files give empty parts, never an error."""
    run_dir = _path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    rounds = stage_results(state)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    margins, evals = {}, {}
    # iterdir, not glob: epath's glob mangles gs:// URLs on the fsspec back end.
    for folder in sorted(run_dir.iterdir(), key=lambda f: f.name):
        match = re.fullmatch(r"round_(\d+)", folder.name)
        if not match:
            continue
        i = int(match.group(1))
        pairs = _read_jsonl_lenient(folder / "pairs.jsonl")
        if pairs:
            margins[i] = [float(p["margin"]) for p in pairs if "margin" in p]
        records = _read_jsonl_lenient(folder / "eval.jsonl")
        if records:
            evals[i] = records
    config_path = run_dir / "config.yaml"
    return RunData(
        run_dir=run_dir,
        rounds=rounds,
        metrics=_read_jsonl_lenient(run_dir / "metrics.jsonl"),
        summary_rows=list(summary.get("rounds", [])),
        stage_seconds={k: float(v.get("seconds", 0.0)) for k, v in state.get("stages", {}).items()},
        margins=dict(sorted(margins.items())),
        eval_records=dict(sorted(evals.items())),
        config_text=config_path.read_text(encoding="utf-8") if config_path.exists() else "",
    )


@dataclasses.dataclass
class Figure:
    """One plot of the report: its file name, title and a caption with its numbers."""

    name: str
    title: str
    caption: str
    png: bytes


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _per_round(data: RunData, stage: str, key: str) -> dict[int, float]:
    out = {}
    for i, stages in data.rounds.items():
        value = stages.get(stage, {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[i] = float(value)
    return out


def plot_win_rates(data: RunData) -> Figure | None:
    """Win rate vs SFT per round with 95% error bars; SFT itself sits at ½."""
    import matplotlib.pyplot as plt

    points = {i: s["eval"] for i, s in data.rounds.items() if "win_rate" in s.get("eval", {})}
    if not points:
        return None
    rounds = sorted(points)
    rates = [points[i]["win_rate"] for i in rounds]
    lows = [points[i].get("win_ci", [r, r])[0] for i, r in zip(rounds, rates, strict=True)]
    highs = [points[i].get("win_ci", [r, r])[1] for i, r in zip(rounds, rates, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="SFT (tie with itself)")
    yerr = [
        [max(0.0, r - lo) for r, lo in zip(rates, lows, strict=True)],
        [max(0.0, hi - r) for r, hi in zip(rates, highs, strict=True)],
    ]
    ax.errorbar(rounds, rates, yerr=yerr, fmt="o-", capsize=4, label="win rate vs SFT (95% CI)")
    for i, r in zip(rounds, rates, strict=True):
        ax.annotate(f"{r:.2f}", (i, r), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set(xlabel="round", ylabel="win rate", ylim=(0, 1), title="Win rate vs SFT per round")
    ax.set_xticks(rounds)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    caption = "; ".join(
        f"round {i}: {r:.3f} [{lo:.3f}, {hi:.3f}] (n={points[i].get('wins', 0) + points[i].get('ties', 0) + points[i].get('losses', 0)})"  # noqa: E501
        for i, r, lo, hi in zip(rounds, rates, lows, highs, strict=True)
    )
    return Figure("win_rate.png", "Win rate vs SFT", caption, _figure_png(fig))


def plot_round_series(
    data: RunData, stage: str, key: str, name: str, title: str, ylabel: str, chance: float | None
) -> Figure | None:
    """A per-round bar chart of one stage result (e.g. gold agreement, flagged fraction)."""
    import matplotlib.pyplot as plt

    values = _per_round(data, stage, key)
    if not values:
        return None
    rounds = sorted(values)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar([str(i) for i in rounds], [values[i] for i in rounds], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance})")
        ax.legend(loc="upper right", fontsize=8)
    top = max(1.0, max(values.values()) * 1.15)
    ax.set(xlabel="round", ylabel=ylabel, ylim=(0, top), title=title)
    ax.grid(axis="y", alpha=0.3)
    caption = "; ".join(f"round {i}: {values[i]:.3f}" for i in rounds)
    return Figure(name, title, caption, _figure_png(fig))


def plot_margin_histograms(data: RunData) -> Figure | None:
    """Histograms of the judged reward margins ``r_chosen − r_rejected`` of each round's pairs."""
    import matplotlib.pyplot as plt

    margins = {i: np.asarray(m) for i, m in data.margins.items() if len(m)}
    if not margins:
        return None
    everything = np.concatenate(list(margins.values()))
    bins = np.histogram_bin_edges(everything, bins=min(30, max(5, everything.size // 4)))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, m in margins.items():
        ax.hist(m, bins=bins, histtype="step", linewidth=1.6, label=f"round {i} (n={m.size})")
    ax.set(xlabel="judged margin r_chosen - r_rejected", ylabel="pairs")
    ax.set_title("Judged reward margins per round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    caption = "; ".join(
        f"round {i}: n={m.size}, mean {m.mean():.3f}, median {np.median(m):.3f}"
        for i, m in margins.items()
    )
    return Figure("margins.png", "Judged reward margins", caption, _figure_png(fig))


TRAINING_PANELS = (("train/loss", "loss"), ("rewards/margin", "reward margin"))


def plot_training(data: RunData) -> Figure | None:
    """Loss and reward margin per training step, one colour per stage tag, steps laid end
    to end across rounds."""
    import matplotlib.pyplot as plt

    series = {key: step_series(data.metrics, key) for key, _ in TRAINING_PANELS}
    tags = list(dict.fromkeys(t for s in series.values() for t in s))
    if not tags:
        return None
    offsets, total = {}, 0
    for tag in tags:
        offsets[tag] = total
        total += max((max(s[tag][0]) for s in series.values() if tag in s), default=0)
    fig, axes = plt.subplots(len(TRAINING_PANELS), 1, figsize=(7, 5), sharex=True)
    for ax, (key, label) in zip(axes, TRAINING_PANELS, strict=True):
        for n, tag in enumerate(tags):
            if tag in series[key]:
                steps, values = series[key][tag]
                color = f"C{n % 10}"
                ax.plot([offsets[tag] + s for s in steps], values, color=color, label=tag)
            if offsets[tag]:
                ax.axvline(offsets[tag] + 0.5, color="gray", linewidth=0.6, linestyle=":")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Training curves (steps laid end to end across rounds)")
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("step")
    parts = []
    for tag in tags:
        bits = []
        for key, label in TRAINING_PANELS:
            if tag in series[key]:
                values = series[key][tag][1]
                bits.append(f"{label} {values[0]:.3f} → {values[-1]:.3f}")
        parts.append(
            f"{tag}: {len(series['train/loss'].get(tag, ([], []))[0])} steps, " + ", ".join(bits)
        )
    return Figure("training.png", "Training curves", "; ".join(parts), _figure_png(fig))


def report_figures(data: RunData) -> list[Figure]:
    """All plots the data supports, in report order."""
    figures = [
        plot_win_rates(data),
        plot_round_series(
            data,
            "judge",
            "gold_agreement",
            "gold_agreement.png",
            "Self-label agreement with the gold judge",
            "agreement",
            chance=0.5,
        ),
        plot_round_series(
            data,
            "train",
            "mean/spa/flagged_fraction",
            "flagged_fraction.png",
            "Flagged-pair fraction (mean over the round's steps)",
            "flagged fraction",
            chance=None,
        ),
        plot_margin_histograms(data),
        plot_training(data),
    ]
    return [f for f in figures if f is not None]


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k, _ in columns) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# Round-summary keys in reading order: data, judging, training, evaluation.
# The round-summary columns (key, header), in order; SPA's table and the report share it.
SUMMARY_COLUMNS = (
    ("round", "round"),
    ("pairs", "pairs"),
    ("skipped", "skipped"),
    ("gold_agreement", "self-label agreement w/ gold"),
    ("flagged_fraction", "flagged"),
    ("margin_mean", "judged margin"),
    ("train_reward_margin", "train reward margin"),
    ("win_rate", "win rate vs SFT"),
    ("win_ci", "95% CI"),
    ("gold_score", "gold score"),
    ("mean_words", "words/response"),
)


# PLE's iteration-summary columns (key, header), in order.
PLE_SUMMARY_COLUMNS = (
    ("iteration", "iteration"),
    ("tau", "τ_t"),
    ("pairs", "pairs"),
    ("ranking_fraction", "→ ranking"),
    ("sft_fraction", "→ weighted SFT"),
    ("principle_better", "y_p better (ranked)"),
    ("reward_plain", "reward y"),
    ("reward_principle", "reward y_p"),
    ("train_loss", "train loss"),
    ("win_rate", "win rate vs start"),
    ("win_ci", "95% CI"),
    ("gold_score", "gold score"),
    ("mean_words", "words/response"),
)


def _summary_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    present = set(k for r in rows for k in r)
    known = [(k, h) for k, h in SUMMARY_COLUMNS if k in present]
    names = {k for k, _ in known}
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in names]
    return known + [(k, k.replace("_", " ")) for k in extra]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " / ".join(str(m.get("content", "")) for m in prompt if isinstance(m, Mapping))
    return str(prompt)


EXAMPLE_COLUMNS = [
    ("prompt", "prompt"),
    ("response", "response"),
    ("score", "score"),
    ("baseline", "SFT response"),
    ("baseline_score", "SFT score"),
]
MAX_EXAMPLES = 6


def _examples(data: RunData) -> tuple[int, list[dict]] | None:
    if not data.eval_records:
        return None
    last = max(data.eval_records)
    rows = [
        {**r, "prompt": _prompt_text(r.get("prompt"))}
        for r in data.eval_records[last][:MAX_EXAMPLES]
    ]
    return last, rows


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def render_html(data: RunData, figures: Sequence[Figure]) -> str:
    """A self-contained page: summary table, plots as base64 PNGs, examples, timings, config."""
    title = f"jaxalign run report: {data.run_dir.name}"
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{HTML_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Run directory: <code>{html.escape(str(data.run_dir))}</code>; rounds with "
        f"results: {', '.join(str(i) for i in data.rounds) or 'none yet'}.</p>",
    ]
    if data.summary_rows:
        parts += [
            "<h2>Summary</h2>",
            _html_table(data.summary_rows, _summary_columns(data.summary_rows)),
        ]
    parts.append("<h2>Plots</h2>")
    if not figures:
        parts.append("<p>Nothing to plot yet: no stage of this run has finished.</p>")
    for fig in figures:
        encoded = base64.b64encode(fig.png).decode("ascii")
        parts.append(
            f"<figure><h3>{html.escape(fig.title)}</h3>"
            f"<img alt='{html.escape(fig.title)}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
        )
    examples = _examples(data)
    if examples:
        last, rows = examples
        parts += [
            f"<h2>Evaluation examples (round {last})</h2>",
            _html_table(rows, EXAMPLE_COLUMNS),
        ]
    if data.stage_seconds:
        rows = [{"stage": k, "seconds": v} for k, v in data.stage_seconds.items()]
        parts += [
            "<h2>Stage times</h2>",
            _html_table(rows, [("stage", "stage"), ("seconds", "seconds")]),
        ]
    if data.config_text:
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(data.config_text)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(data: RunData, figures: Sequence[Figure]) -> str:
    """``report.md``: the same content, with the plots as PNG files beside it."""
    lines = [f"# jaxalign run report: {data.run_dir.name}", ""]
    if data.summary_rows:
        lines += [
            "## Summary",
            "",
            format_table(data.summary_rows, _summary_columns(data.summary_rows)),
            "",
        ]
    lines += ["## Plots", ""]
    if not figures:
        lines += ["Nothing to plot yet: no stage of this run has finished.", ""]
    for fig in figures:
        lines += [f"### {fig.title}", "", f"![{fig.title}]({fig.name})", "", fig.caption, ""]
    examples = _examples(data)
    if examples:
        last, rows = examples
        lines += [
            f"## Evaluation examples (round {last})",
            "",
            format_table(rows, EXAMPLE_COLUMNS),
            "",
        ]
    if data.stage_seconds:
        rows = [{"stage": k, "seconds": v} for k, v in data.stage_seconds.items()]
        lines += [
            "## Stage times",
            "",
            format_table(rows, [("stage", "stage"), ("seconds", "seconds")]),
            "",
        ]
    return "\n".join(lines)


def _write_bytes(path: pathlib.Path | epath.Path, payload: bytes) -> None:
    if _remote(path):  # an object appears only once its upload completes
        path.write_bytes(payload)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_report(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> pathlib.Path | epath.Path:
    """Writes ``report.html`` (self-contained), ``report.md`` and the PNGs of a run.

    ``out_dir`` defaults to ``<run_dir>/report``. Plots: win rate vs SFT per round
    with 95% error bars; self-label agreement with the gold judge per round;
    flagged-pair fraction per round; judged reward-margin histograms per round;
    loss and reward margin per training step. Works on a partial run (plots what
    exists). Only process 0 writes; every process returns the HTML path.
    """
    import matplotlib

    matplotlib.use("Agg")
    run_dir = _path(run_dir)
    out = _path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    html_path = out / "report.html"
    if jax.process_index() != 0:
        return html_path
    data = load_run(run_dir)
    figures = report_figures(data)
    out.mkdir(parents=True, exist_ok=True)
    for fig in figures:
        _write_bytes(out / fig.name, fig.png)
    _write_bytes(out / "report.md", render_markdown(data, figures).encode("utf-8"))
    _write_bytes(html_path, render_html(data, figures).encode("utf-8"))
    return html_path
