"""Metrics logging and round summaries.

``MetricsWriter`` appends one JSON object per logged step to ``metrics.jsonl``
(and to TensorBoard when ``tensorboardX`` is installed); on a multi-host run
only process 0 writes. ``format_table`` renders the end-of-run round summary.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class MetricsWriter:
    """Appends ``{"tag": ..., "step": ..., **scalars}`` lines to a JSONL file."""

    def __init__(self, path: str | os.PathLike, tensorboard_dir: str | None = None):
        self.path = pathlib.Path(path)
        self.enabled = jax.process_index() == 0
        self._tb = None
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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(f"{tag}/{k}", v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
