"""Resumable rounds: the stage machinery shared by SPA and PLE.

A run directory holds one folder per round (``round_0``, ``round_1``, ...) and a
``state.json`` that records every finished stage with what it produced. A stage
runs at most once: rerunning the same command after a crash (kill -9 included)
skips every finished stage and repeats only the one that was cut off. Artifacts
are written atomically (a temporary file, then ``os.replace``), so a reader sees
either the whole file or none of it; ``state.json`` is updated only after a
stage's artifacts are in place.

The run's config is saved as ``config.yaml``; resuming with a config that
changes anything but the harmless fields (progress bars, output directory) is
refused with the list of changed keys, since the finished stages would not
match it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import yaml

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
# Fields that may differ between the first run and a resume.
_RESUMABLE_CHANGES = ("run.progress", "run.output_dir")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes records as JSON lines atomically; returns how many were written."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSONL artifact written by this run; a bad line is an error naming the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yields a temporary directory that becomes ``path`` only if the block succeeds."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class RoundRunner:
    """Runs named stages of numbered rounds once each, remembering them in ``state.json``.

    Usage::

        runner = RoundRunner(run_dir, config_dict)
        out = runner.stage(1, "sample", lambda d: {"candidates": str(d / "candidates.jsonl")})

    ``fn(round_dir)`` does the work and returns a JSON-able dict of results
    (artifact paths, counts, metrics); the dict is stored, and on a rerun the
    stored dict is returned without calling ``fn``.
    """

    def __init__(self, run_dir: str | os.PathLike, config: dict, *, log: Callable = print):
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        config_path = self.run_dir / CONFIG_FILE
        if config_path.exists():
            old = yaml.safe_load(config_path.read_text()) or {}
            changed = [k for k in config_differences(old, config) if k not in _RESUMABLE_CHANGES]
            if changed:
                raise ValueError(
                    f"{self.run_dir} holds a run made with a different config "
                    f"(changed: {', '.join(changed)}). Resume with the original config, "
                    "or choose a new run.output_dir."
                )
        else:
            atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
        state_path = self.run_dir / STATE_FILE
        self.state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}

    def round_dir(self, round_index: int) -> pathlib.Path:
        path = self.run_dir / f"round_{round_index}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def key(round_index: int, name: str) -> str:
        return f"round_{round_index}/{name}"

    def done(self, round_index: int, name: str) -> bool:
        return self.key(round_index, name) in self.state["stages"]

    def result(self, round_index: int, name: str) -> dict:
        return self.state["stages"][self.key(round_index, name)]["result"]

    def stage(self, round_index: int, name: str, fn: Callable[[pathlib.Path], dict]) -> dict:
        key = self.key(round_index, name)
        if key in self.state["stages"]:
            self.log(f"[{key}] done earlier, skipping")
            return self.state["stages"][key]["result"]
        self.log(f"[{key}] starting")
        start = time.perf_counter()
        result = fn(self.round_dir(round_index))
        seconds = time.perf_counter() - start
        self.state["stages"][key] = {"result": result, "seconds": round(seconds, 3)}
        self.state["last_stage"] = key
        atomic_write_text(self.run_dir / STATE_FILE, json.dumps(self.state, indent=1))
        self.log(f"[{key}] finished in {seconds:.1f}s")
        return result

    def seconds(self, round_index: int, name: str) -> float | None:
        entry = self.state["stages"].get(self.key(round_index, name))
        return None if entry is None else entry["seconds"]


def finish_run(
    runner: RoundRunner,
    rows: list[dict],
    table: str,
    *,
    title: str,
    rows_key: str,
    seconds: float,
) -> dict:
    """Writes ``summary.json`` and ``summary.md`` for a run and returns the summary dict.

    ``rows`` are the per-round (or per-iteration) summary rows under ``rows_key``;
    ``table`` is their Markdown rendering.
    """
    stage_seconds = {k: v["seconds"] for k, v in runner.state["stages"].items()}
    summary = {rows_key: rows, "seconds_this_invocation": seconds, "stage_seconds": stage_seconds}
    atomic_write_text(runner.run_dir / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(runner.run_dir / "summary.md", f"# {title}\n\n{table}\n")
    runner.log("\n" + table)
    return summary
