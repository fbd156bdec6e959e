"""Resumable rounds: the stage machinery shared by SPA and PLE.

A run directory holds one folder per round (``round_0``, ``round_1``, ...) and a
``state.json`` that records every finished stage with what it produced. A stage
runs at most once: rerunning the same command after a crash (kill -9 included)
skips every finished stage and repeats only the one that was cut off. Artifacts
are written atomically, so a reader sees either the whole file or none of it;
``state.json`` is updated only after a stage's artifacts are in place.

Run directories may be local paths or object-store URLs (``gs://bucket/run``,
through ``etils.epath``). Locally a file is written to a temporary file and moved
into place with ``os.replace``; an object store publishes an object whole when
its upload finishes, so there the file is written directly.

In a multi-process run (``jax.process_count() > 1``) every process computes the
same stages, but only process 0 writes the run's files; after each stage all
processes wait for each other, so every process can then read what process 0
wrote. The run directory must therefore be storage that all hosts share (a
``gs://`` bucket, NFS); :class:`RoundRunner` checks that at start.

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
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import jax
import yaml
from etils import epath

from jaxalign import parallel, throughput
from jaxalign.loading import default_cache_dir

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
# Fields that may differ between the first run and a resume: none changes a finished stage
# (run.export_hf only chooses which rounds are exported at the end; run.compile_cache only
# whether compiled programs are reused).
_RESUMABLE_CHANGES = ("run.progress", "run.output_dir", "run.export_hf", "run.compile_cache")

RunPath = pathlib.Path | epath.Path


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store or remote file system (``scheme://...``)."""
    return "://" in os.fspath(path)


# URL schemes and the package that etils.epath reaches them through (without TensorFlow).
_FILE_SYSTEM_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs"}


def require_file_system(path: str | os.PathLike, what: str = "run.output_dir") -> None:
    """Fails at once, saying what to install, when ``path`` is a URL whose file system
    package is missing (``gs://`` needs gcsfs where TensorFlow is not installed); else
    ``etils.epath`` would fail at the first file the run touches, on every host."""
    import importlib.util

    if not is_remote(path):
        return
    scheme = os.fspath(path).split("://", 1)[0]
    package = _FILE_SYSTEM_PACKAGES.get(scheme)
    if package is None or importlib.util.find_spec(package) is not None:
        return
    if importlib.util.find_spec("tensorflow") is not None:
        return  # etils.epath goes through tf.io.gfile then
    extra = " (the 'gcs' extra: pip install 'jaxalign[gcs]'; 'tpu' includes it)"
    raise ValueError(
        f"{what}={os.fspath(path)}: {scheme}:// needs the {package} package, which is not "
        f"installed; pip install {package}{extra if package == 'gcsfs' else ''} on every machine"
    )


def _through_epath(path: str | os.PathLike) -> bool:
    return isinstance(path, epath.Path) or is_remote(path)


def run_path(path: str | os.PathLike) -> RunPath:
    """A path object for ``path``: ``pathlib.Path`` locally, ``epath.Path`` for ``gs://`` etc.

    (``pathlib.Path("gs://b/x")`` would collapse the scheme to ``gs:/b/x``.)
    """
    return epath.Path(path) if _through_epath(path) else pathlib.Path(path)


def _write_local(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_object(path: epath.Path, data: bytes) -> None:
    """Writes ``path`` in one piece through ``etils.epath`` (the non-local write path).

    Object stores make an object visible only when its upload completes, so a
    direct write is already all-or-nothing there (a rename would be a second
    copy). The parent "directory" is created for file systems that need one.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(data)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` all-or-nothing, on this process (whichever it is):
    a temporary file and a rename locally, one object upload on ``gs://`` and the like."""
    if _through_epath(path):
        write_object(epath.Path(path), data)
    else:
        _write_local(pathlib.Path(path), data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` so that a crash leaves either the old file or the new one.

    Only process 0 of a multi-process run writes; the others (which computed the
    same text) return at once.
    """
    if parallel.is_primary_process():
        write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes records as JSON lines atomically; returns how many were written."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSONL artifact written by this run; a bad line is an error naming the line."""
    data = run_path(path).read_bytes()
    out = []
    for lineno, line in enumerate(data.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yields a directory that becomes ``path`` only if the block succeeds.

    Locally: a temporary sibling directory, renamed over ``path`` at the end. On
    an object store, where a directory is only a name prefix and a rename copies
    every object, the block writes under ``path`` itself after its old contents
    are removed; a crash there leaves a partial directory, which the stage
    machinery never trusts because ``state.json`` does not record it.
    """
    if _through_epath(path):
        target = epath.Path(path)
        if target.exists():
            target.rmtree()
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
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


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two config dicts.

    ``defaults``: a key missing from ``old`` (a run made before that option existed) that
    ``new`` holds at its default value here is not a difference: options are added with
    the behaviour they had before as their default."""
    a, b = _flatten(old), _flatten(new)
    d = _flatten(defaults) if defaults is not None else {}
    return sorted(
        k
        for k in set(a) | set(b)
        if a.get(k) != b.get(k) and not (k not in a and k in d and b.get(k) == d[k])
    )


class RoundRunner:
    """Runs named stages of numbered rounds once each, remembering them in ``state.json``.

    Usage::

        runner = RoundRunner(run_dir, config_dict)
        out = runner.stage(1, "sample", lambda d: {"candidates": str(d / "candidates.jsonl")})
        params = runner.produce(1, "train", train, load=lambda result: read(result["model"]))

    ``defaults``: the config's default values (:func:`config_differences`), so a run made
    before an option existed resumes when the option is at its default.

    ``fn(round_dir)`` does the work and returns a JSON-able dict of results
    (artifact paths, counts, metrics); the dict is stored, and on a rerun the
    stored dict is returned without calling ``fn``. :meth:`produce` does the same
    for a stage that also hands a value (parameters) to the next one.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict,
        *,
        log: Callable = print,
        defaults: dict | None = None,
    ):
        self.run_dir = run_path(run_dir)
        self.primary = parallel.is_primary_process()
        if self.primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._check_shared_storage()
        config_path = self.run_dir / CONFIG_FILE
        state_path = self.run_dir / STATE_FILE
        if config_path.exists():
            old = yaml.safe_load(config_path.read_text()) or {}
            changed = [
                k for k in config_differences(old, config, defaults) if k not in _RESUMABLE_CHANGES
            ]
            if changed:
                raise ValueError(
                    f"{self.run_dir} holds a run made with a different config "
                    f"(changed: {', '.join(changed)}). Resume with the original config, "
                    "or choose a new run.output_dir."
                )
        self.state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
        # Every process has read the same state before process 0 writes anything new.
        parallel.sync_processes("jaxalign-run-state-read")
        if not config_path.exists():
            atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))

    def _check_shared_storage(self) -> None:
        """In a multi-process run, fails unless every process sees process 0's run directory."""
        import jax

        if jax.process_count() == 1:
            return
        token = self.run_dir / ".shared-storage-check"
        if self.primary:
            atomic_write_text(token, uuid.uuid4().hex)
        parallel.sync_processes("jaxalign-shared-check-written")
        seen = token.exists()
        parallel.sync_processes("jaxalign-shared-check-read")
        if self.primary:
            token.unlink()
        if not seen:
            raise RuntimeError(
                f"process {jax.process_index()} cannot see {self.run_dir} as process 0 "
                "wrote it; a multi-host run needs run.output_dir on storage every host shares "
                "(a gs:// bucket or a network file system)"
            )

    def round_dir(self, round_index: int) -> RunPath:
        path = self.run_dir / f"round_{round_index}"
        if self.primary:
            path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def key(round_index: int, name: str) -> str:
        return f"round_{round_index}/{name}"

    def done(self, round_index: int, name: str) -> bool:
        return self.key(round_index, name) in self.state["stages"]

    def result(self, round_index: int, name: str) -> dict:
        return self.state["stages"][self.key(round_index, name)]["result"]

    def peak_flops(self) -> float | None:
        """The peak a stage's scoring passes are measured against (all devices)."""
        return throughput.peak_flops(jax.devices(), default_cache_dir())

    def stage(self, round_index: int, name: str, fn: Callable[[RunPath], dict]) -> dict:
        key = self.key(round_index, name)
        if key in self.state["stages"]:
            self.log(f"[{key}] done earlier, skipping")
            return self.state["stages"][key]["result"]
        self.log(f"[{key}] starting")
        start = time.perf_counter()
        compiled = throughput.compile_stats()
        decoded = throughput.decoding_stats()
        scored = throughput.scoring_stats()
        result = fn(self.round_dir(round_index))
        seconds = time.perf_counter() - start
        compiled = throughput.compiles_since(compiled)
        decoded = throughput.decoding_since(decoded)
        if throughput.scoring_stats() != scored:  # the peak (a file read) only when used
            scored = throughput.scoring_since(scored, self.peak_flops())
        else:
            scored = {}
        self.state["stages"][key] = {
            "result": result,
            "seconds": round(seconds, 3),
            **compiled,
            **({"decoding": decoded} if decoded else {}),
            **({"scoring": scored} if scored else {}),
        }
        self.state["last_stage"] = key
        atomic_write_text(self.run_dir / STATE_FILE, json.dumps(self.state, indent=1))
        # The other processes may read this stage's artifacts from here on.
        parallel.sync_processes(f"jaxalign-stage-{key}")
        self.log(
            f"[{key}] finished in {seconds:.1f}s ({compiled['compiles']} programs compiled in "
            f"{compiled['compile_seconds']:.1f}s, {compiled['compile_cache_hits']} from the cache)"
        )
        if scored:
            self.log(
                f"[{key}] scored {scored['scored_sequences']} sequences "
                f"({scored['scored_sequences_per_second']:.1f}/s, "
                f"{scored['scored_tokens_per_second']:.0f} tokens/s, padding "
                f"{scored['padding']:.0%})"
                + (f", {scored['warm_mfu']:.2f} of peak" if "warm_mfu" in scored else "")
            )
        if decoded:
            self.log(
                f"[{key}] decoded {decoded['sampled_tokens']} response tokens "
                f"({decoded['sampled_tokens_per_second']:.0f}/s) in {decoded['decoded_tokens']} "
                f"row steps ({decoded['decoded_tokens_per_second']:.0f}/s; rows that ended "
                "early decode on until their batch shrinks or ends)"
            )
        return result

    def produce(
        self,
        round_index: int,
        name: str,
        fn: Callable[[RunPath], tuple[dict, Any]],
        load: Callable[[dict], Any],
    ) -> Any:
        """Runs a stage that makes a value besides its artifacts (e.g. trained parameters).

        ``fn(round_dir) -> (result, value)``; ``result`` is stored as :meth:`stage` stores
        it. Returns ``value``: ``fn``'s own when the stage runs now, ``load(result)`` (e.g.
        the parameters read back from the path in ``result``) when it finished earlier.
        """
        made = []

        def run(round_dir):
            result, value = fn(round_dir)
            made.append(value)
            return result

        result = self.stage(round_index, name, run)
        return made[0] if made else load(result)

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
    stages = runner.state["stages"]
    stage_seconds = {k: v["seconds"] for k, v in stages.items()}
    # Programs compiled by each stage when it ran (absent for stages of older runs).
    stage_compiles = {
        k: {f: v[f] for f in ("compiles", "compile_seconds", "compile_cache_hits")}
        for k, v in stages.items()
        if "compiles" in v
    }
    # Tokens decoded by each sampling stage and their rates (absent for older runs).
    stage_decoding = {k: v["decoding"] for k, v in stages.items() if "decoding" in v}
    # Sequences scored by each stage's log-prob passes (judge, reference) and their rates.
    stage_scoring = {k: v["scoring"] for k, v in stages.items() if "scoring" in v}
    summary = {
        rows_key: rows,
        "seconds_this_invocation": seconds,
        "stage_seconds": stage_seconds,
        "stage_compiles": stage_compiles,
        "stage_decoding": stage_decoding,
        "stage_scoring": stage_scoring,
    }
    atomic_write_text(runner.run_dir / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(runner.run_dir / "summary.md", f"# {title}\n\n{table}\n")
    runner.log("\n" + table)
    return summary
