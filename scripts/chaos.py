"""Kill -9 chaos test: a jaxalign command killed at random moments and rerun until it
finishes leaves the same artifacts as the same command run once, uninterrupted.

    python scripts/chaos.py --scenario all --kills 3 --seed 0 --workdir /tmp/chaos
    python scripts/chaos.py --kills 3 --workdir /tmp/chaos -- \\
        jaxalign generate --model M --prompts p.jsonl --out {out}/samples.jsonl

``{out}`` in the command is the folder the command writes into: ``WORKDIR/reference/out``
for the uninterrupted run, ``WORKDIR/killed/out`` for the other one. A command that starts
with ``jaxalign`` runs as ``python -m jaxalign`` of this checkout.

1. The command runs uninterrupted; its wall time is ``T``.
2. It runs again into the second folder, and SIGKILL goes to its whole process group
   ``--kills K`` times, at moments drawn uniformly from ``[0, T)`` (seeded by ``--seed``),
   each measured from the start of that attempt; after each kill the same command is
   started again. A kill lands only if the attempt is still running at its moment; once
   an attempt exits 0 the run is complete and the moments left are not used. After the
   K moments the command is rerun until it exits 0.
3. Every artifact of either folder is compared with the other's (see
   :func:`compare_outputs`): bytes for files (JSONL outputs, pairs, eval files, exported
   safetensors, model cards, configs), the fields in :data:`TIME_DEPENDENT` removed first;
   restored arrays for orbax folders (``np.array_equal`` leaf by leaf, and each train-state
   checkpoint's JSON data cursor). The run folder's own path, which configs, ``state.json``
   and model cards name, is read as ``{out}`` in both.
   ``metrics.jsonl`` is an append-only log: a stage resumed from its last checkpoint logs
   the steps after it again, and readers keep the last row of each ``(tag, step)``
   (:func:`jaxalign.report.step_series`); those rows are compared, without their
   ``perf/*`` throughput fields (seconds and tokens/s of the step, which vary run to run).

The JSON report (stdout, and ``WORKDIR/report.json``) gives the command, K, the kill
moments, how many kills landed, each artifact as ``identical`` or what differs, and
``pass``; the script exits 1 when any artifact differs or the killed run never finished.

Scenarios (``--scenario``) run on the tiny random model of :mod:`jaxalign.tiny_model` and
slices of the demo data: ``generate`` (64 prompts, 32 batches), ``dpo`` (``--save-every 2``),
``spa`` (one self-refining round, ``run.checkpoint_every=1``, so a kill inside a train stage
resumes it from its last step) and ``ple`` (two iterations, ``run.checkpoint_every=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A scoring pass's wall times and rates (a resumed stage compiles again: its warm share too).
SCORING_TIMES = (
    "scoring_seconds",
    "warm_scoring_seconds",
    "scored_sequences_per_second",
    "scored_tokens_per_second",
    "warm_model_tflops_per_second",
    "warm_mfu",
)
# What legitimately differs between two runs of one command: wall-clock measurements. They
# are removed before the comparison; nothing else is.
TIME_DEPENDENT = {
    "state.json": (
        "stages.*.seconds",
        "stages.*.result.checkpoint_seconds",
        "stages.*.compiles",  # a resumed stage compiles its programs again
        "stages.*.compile_seconds",
        "stages.*.compile_cache_hits",
        "stages.*.decoding.decode_seconds",  # the token counts beside them are compared
        "stages.*.decoding.sampled_tokens_per_second",
        "stages.*.decoding.decoded_tokens_per_second",
        "stages.*.decoding.warm_decoded_tokens",  # a resumed stage compiles again
        "stages.*.decoding.warm_decode_seconds",
        "stages.*.decoding.warm_decoded_tokens_per_second",
        *(f"stages.*.scoring.{k}" for k in SCORING_TIMES),  # sequences and tokens compared
    ),
    "summary.json": (
        "seconds_this_invocation",
        "stage_seconds",
        "stage_compiles",
        "stage_decoding.*.decode_seconds",
        "stage_decoding.*.sampled_tokens_per_second",
        "stage_decoding.*.decoded_tokens_per_second",
        "stage_decoding.*.warm_decoded_tokens",
        "stage_decoding.*.warm_decode_seconds",
        "stage_decoding.*.warm_decoded_tokens_per_second",
        *(f"stage_scoring.*.{k}" for k in SCORING_TIMES),
    ),
    "report/report.md": ("the 'Stage times' section (state.json's stage seconds)",),
    "report/report.html": ("the 'Stage times' section (state.json's stage seconds)",),
    "tensorboard/": ("every event (each carries its wall time): not compared",),
    "metrics.jsonl": ("perf/* of every row (step seconds, tokens/s, MFU)",),
}
# Left behind by a kill between a temporary file's creation and its rename; never read
# (a stage's files count only once state.json records the stage; orbax ignores its
# uncommitted step folders). Listed in the report, not compared.
DEBRIS = (".*.tmp", "*.orbax-checkpoint-tmp*")


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Attempt:
    """One start of the command: how long it ran, and how it ended."""

    seconds: float
    exit_code: int | None  # None: killed by us
    kill_at: float | None = None

    @property
    def killed(self) -> bool:
        return self.exit_code is None

    def to_dict(self) -> dict:
        end = "killed" if self.killed else f"exit {self.exit_code}"
        return {"kill_at": self.kill_at, "seconds": round(self.seconds, 3), "end": end}


def command_argv(command: Sequence[str], out: Path) -> list[str]:
    """``command`` with ``{out}`` replaced; ``jaxalign ...`` runs as ``python -m jaxalign``."""
    argv = [arg.replace("{out}", str(out)) for arg in command]
    if argv and argv[0] == "jaxalign":
        argv = [sys.executable, "-m", "jaxalign", *argv[1:]]
    return argv


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every run: this one (or ``env``), with this checkout first on
    ``PYTHONPATH`` and JAX on the CPU unless ``JAX_PLATFORMS`` says otherwise."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_once(
    argv: Sequence[str],
    env: dict[str, str],
    log: Path,
    *,
    kill_at: float | None = None,
    kill_when: Callable[[], bool] | None = None,
    timeout: float = 3600.0,
    poll: float = 0.005,
) -> Attempt:
    """Runs ``argv`` in a new process group; SIGKILLs the group ``kill_at`` seconds after
    the start, or as soon as ``kill_when()`` is true, if the command is still running."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(argv)}  (kill_at={kill_at})\n".encode())
        out.flush()
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while True:
                code = proc.poll()
                elapsed = time.monotonic() - start
                if code is not None:
                    return Attempt(elapsed, code, kill_at)
                due = kill_at is not None and elapsed >= kill_at
                if due or (kill_when is not None and kill_when()) or elapsed > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet: no race
                    if proc.wait() != -signal.SIGKILL:  # it had exited on its own just before
                        return Attempt(elapsed, proc.returncode, kill_at)
                    if elapsed > timeout:
                        raise TimeoutError(f"{shlex.join(argv)} ran past {timeout:.0f} s")
                    out.write(b"\n[chaos] SIGKILL\n")
                    return Attempt(time.monotonic() - start, None, kill_at)
                time.sleep(poll)
        finally:
            if proc.poll() is None:  # interrupted ourselves: leave no run behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_to_completion(
    argv: Sequence[str], env: dict[str, str], log: Path, *, max_failures: int = 2
) -> list[Attempt]:
    """Reruns ``argv`` until it exits 0, giving up after ``max_failures`` failed exits."""
    attempts = []
    while sum(not a.killed and a.exit_code != 0 for a in attempts) < max_failures:
        attempts.append(run_once(argv, env, log))
        if attempts[-1].exit_code == 0:
            break
    return attempts


def kill_moments(kills: int, seconds: float, seed: int) -> list[float]:
    """``kills`` moments drawn uniformly from ``[0, seconds)``, in milliseconds' precision."""
    rng = random.Random(seed)
    return [round(rng.uniform(0.0, seconds), 3) for _ in range(kills)]


Trigger = float | Callable[[Path], bool]  # seconds after an attempt's start, or a condition


def progress_of(out: Path) -> dict:
    """What a killed attempt left: the last stage ``state.json`` records, each checkpoint
    folder's newest step, and the lines of the JSONL files at the top of ``out``."""
    state = out / "state.json"
    steps = {}
    for folder in sorted(out.rglob("checkpoints")):
        done = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
        if done:
            steps[folder.relative_to(out).as_posix()] = max(done)
    return {
        "last_stage": json.loads(state.read_text()).get("last_stage") if state.is_file() else None,
        "checkpoint_steps": steps,
        "lines": {p.name: p.read_bytes().count(b"\n") for p in sorted(out.glob("*.jsonl"))},
    }


def chaos(
    command: Sequence[str],
    workdir: Path,
    *,
    kills: int = 3,
    seed: int = 0,
    triggers: Sequence[Trigger] | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Steps 1-3 of the module docstring; returns the report.

    ``triggers`` replaces the ``kills`` random moments: each is a moment (seconds after
    the attempt's start) or a condition on the killed run's folder, checked every few
    milliseconds (e.g. "its output has 4 lines"), that sends the kill when it holds.
    """
    env = child_env(env)
    reference, killed = workdir / "reference" / "out", workdir / "killed" / "out"
    for folder in (reference, killed):
        shutil.rmtree(folder.parent, ignore_errors=True)
        folder.mkdir(parents=True)
    ref = run_once(command_argv(command, reference), env, workdir / "reference" / "log.txt")
    if ref.exit_code != 0:
        raise RuntimeError(
            f"the uninterrupted run exited {ref.exit_code}; see {workdir / 'reference/log.txt'}"
        )
    argv, log = command_argv(command, killed), workdir / "killed" / "log.txt"
    if triggers is None:
        triggers = kill_moments(kills, ref.seconds, seed)
    attempts: list[Attempt] = []
    left_behind = []
    for trigger in triggers:
        if callable(trigger):
            attempt = run_once(argv, env, log, kill_when=lambda t=trigger: t(killed))
        else:
            attempt = run_once(argv, env, log, kill_at=trigger)
        attempts.append(attempt)
        left_behind.append(progress_of(killed) if attempt.killed else None)
        if attempt.exit_code == 0:
            break
    if not attempts or attempts[-1].exit_code != 0:
        attempts += run_to_completion(argv, env, log)
    finished = attempts[-1].exit_code == 0
    artifacts, debris = compare_outputs(reference, killed) if finished else ({}, [])
    rows = [a.to_dict() for a in attempts]
    for row, left in zip(rows, left_behind, strict=False):
        if left is not None:
            row["left_behind"] = left
    return {
        "command": shlex.join(command),
        "kills": len(triggers),
        "seed": seed,
        "reference_seconds": round(ref.seconds, 3),
        "kill_moments": [t.__name__ if callable(t) else t for t in triggers],
        "kills_landed": sum(a.killed for a in attempts),
        "attempts": rows,
        "finished": finished,
        "artifacts": artifacts,
        "time_dependent_fields_ignored": {k: list(v) for k, v in TIME_DEPENDENT.items()},
        "debris": debris,
        "pass": finished and all(v == "identical" for v in artifacts.values()),
    }


# ----------------------------------------------------------------------------- comparing


def _is_orbax_item(folder: Path) -> bool:
    """A folder orbax finished writing (``checkpoint.save_params``'s, or one step's)."""
    return (folder / "_CHECKPOINT_METADATA").is_file()


def _is_orbax_steps(folder: Path) -> bool:
    """A ``checkpoint.Checkpointer`` folder: numbered step folders."""
    steps = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return bool(steps) and all(_is_orbax_item(p) for p in steps)


def _is_debris(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in DEBRIS)


def artifacts_of(root: Path) -> tuple[dict[str, str], list[str]]:
    """``({relative path: kind}, debris)`` of a run folder. Kinds: ``checkpoints`` (a
    Checkpointer folder), ``params`` (a save_params folder), ``metrics`` (the append-only
    metrics log), ``json`` and ``report`` (with time-dependent fields) and ``bytes``."""
    found: dict[str, str] = {}
    debris: list[str] = []

    def visit(folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            rel = path.relative_to(root).as_posix()
            if _is_debris(path.name):
                debris.append(rel + ("/" if path.is_dir() else ""))
            elif path.is_dir():
                if path.name == "tensorboard":
                    continue  # TIME_DEPENDENT
                if _is_orbax_steps(path):
                    found[rel] = "checkpoints"
                elif _is_orbax_item(path):
                    found[rel] = "params"
                else:
                    visit(path)
            elif path.name == "metrics.jsonl":
                found[rel] = "metrics"
            elif rel in ("report/report.md", "report/report.html"):
                found[rel] = "report"
            elif rel in TIME_DEPENDENT:
                found[rel] = "json"
            else:
                found[rel] = "bytes"

    visit(root)
    return found, debris


def _text(path: Path, root: Path) -> bytes:
    """A file's bytes, with its run folder's path written as ``{out}`` (the two runs write
    into different folders, and configs, state and cards name theirs)."""
    data = path.read_bytes()
    return data.replace(str(root).encode(), b"{out}")


def _strip(tree, pattern: Sequence[str]):
    """``tree`` without the dotted key ``pattern`` (``*`` matches any key)."""
    if not isinstance(tree, dict) or not pattern:
        return tree
    head, rest = pattern[0], pattern[1:]
    out = {}
    for key, value in tree.items():
        if head == "*" or head == key:
            if not rest:
                continue
            value = _strip(value, rest)
        out[key] = value
    return out


def _json(path: Path, root: Path, rel: str) -> str:
    """The JSON file without its :data:`TIME_DEPENDENT` fields, keys in the file's order."""
    tree = json.loads(_text(path, root))
    for field in TIME_DEPENDENT[rel]:
        tree = _strip(tree, field.split("."))
    return json.dumps(tree, indent=1)


def _metrics(path: Path, root: Path) -> dict[tuple, dict]:
    """The metrics log as :func:`jaxalign.report.step_series` reads it: the last row of each
    ``(tag, step)``; a resumed stage logs again the steps after its last checkpoint."""
    rows = {}
    for line in _text(path, root).decode().splitlines():
        if line.strip():
            row = json.loads(line)
            row = {k: v for k, v in row.items() if not k.startswith("perf/")}  # TIME_DEPENDENT
            rows[(row.get("tag"), row.get("step"))] = row
    return rows


def _report(path: Path, root: Path) -> str:
    text = _text(path, root).decode()
    if path.suffix == ".md":
        return re.sub(r"## Stage times\n.*?(?=^## |\Z)", "", text, flags=re.S | re.M)
    return re.sub(r"<h2>Stage times</h2>.*?(?=<h2>|</body>)", "", text, flags=re.S)


def _arrays(tree) -> dict[str, object]:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _differing_arrays(a: dict, b: dict) -> list[str]:
    import numpy as np

    if a.keys() != b.keys():
        return [f"leaves {sorted(a.keys() ^ b.keys())} in one only"]
    return [
        k
        for k in a
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])
    ]


def _checkpoints(folder: Path) -> dict[int, tuple[dict, dict]]:
    from jaxalign.checkpoint import Checkpointer

    with Checkpointer(folder, async_=False) as ckpt:
        out = {}
        for step in ckpt.all_steps():
            state, extra = ckpt.restore(step)
            out[step] = (_arrays(state), extra)
        return out


def _params(folder: Path) -> dict:
    from jaxalign.checkpoint import load_params

    return _arrays(load_params(folder, None))


def compare_artifact(kind: str, rel: str, reference: Path, killed: Path) -> str:
    """``identical``, or what differs between the two runs' ``rel``."""
    a, b = reference / rel, killed / rel
    if kind == "checkpoints":
        mine, theirs = _checkpoints(a), _checkpoints(b)
        if mine.keys() != theirs.keys():
            return f"differs: steps {sorted(mine)} vs {sorted(theirs)}"
        for step in mine:
            leaves = _differing_arrays(mine[step][0], theirs[step][0])
            if leaves:
                return f"differs: step {step} arrays {leaves[:5]}"
            if mine[step][1] != theirs[step][1]:
                return f"differs: step {step} extra (data cursor, running metrics)"
        return "identical"
    if kind == "params":
        leaves = _differing_arrays(_params(a), _params(b))
        return f"differs: arrays {leaves[:5]}" if leaves else "identical"
    if kind == "metrics":
        mine, theirs = _metrics(a, reference), _metrics(b, killed)
        if mine.keys() != theirs.keys():
            return f"differs: (tag, step) rows {sorted(mine.keys() ^ theirs.keys())[:5]}"
        bad = [key for key in mine if mine[key] != theirs[key]]
        return f"differs: rows {bad[:5]}" if bad else "identical"
    if kind == "json":
        same = _json(a, reference, rel) == _json(b, killed, rel)
    elif kind == "report":
        same = _report(a, reference) == _report(b, killed)
    else:
        same = _text(a, reference) == _text(b, killed)
    return "identical" if same else "differs: content"


def compare_outputs(reference: Path, killed: Path) -> tuple[dict[str, str], list[str]]:
    """Every artifact of ``reference`` compared with ``killed``'s (an artifact only one of
    them has differs), and the killed run's debris."""
    ours, _ = artifacts_of(reference)
    theirs, debris = artifacts_of(killed)
    results = {}
    for rel in sorted(ours.keys() | theirs.keys()):
        if ours.get(rel) != theirs.get(rel):
            where = "killed run" if rel in theirs else "reference"
            results[rel] = f"differs: only in the {where} (or of another kind)"
        else:
            results[rel] = compare_artifact(ours[rel], rel, reference, killed)
    return results, debris


# ----------------------------------------------------------------------------- scenarios


def _demo_lines(kind: str, count: int) -> str:
    from jaxalign.data.records import DEMO_FILES

    return "".join(line + "\n" for line in DEMO_FILES[kind].read_text().splitlines()[:count])


def prepare_data(data: Path, model: Path | None = None) -> dict[str, Path]:
    """Slices of the demo data (as tests/test_spa.py and test_ple.py cut them) under
    ``data``, and the tiny model (``model``, or one written there); returns their paths."""
    from jaxalign.tiny_model import write_tiny_model

    data.mkdir(parents=True, exist_ok=True)
    paths = {"model": model or data / "tiny_model"}
    if not (paths["model"] / "model.safetensors").is_file():
        write_tiny_model(paths["model"])
    for name, kind, count in (
        ("seed_pairs", "pairs", 8),
        ("prompts", "prompts", 8),
        ("eval_prompts", "eval", 4),
        ("generate_prompts", "prompts", 64),
    ):
        paths[name] = data / f"{name}.jsonl"
        paths[name].write_text(_demo_lines(kind, count))
    return paths


# The sizes of tests/test_spa.py's and tests/test_ple.py's runs, on one device, in batches
# of 2 pairs (twice their steps: more moments fall inside a train stage).
SMALL_TRAINING = [
    "data.max_response_tokens=16",
    "train.batch_size=2",
    "train.learning_rate=1e-3",
    "train.logp_chunk_size=32",
    "run.progress=false",
    "run.mesh.data=1",
    "run.mesh.fsdp=1",
    "run.mesh.tensor=1",
]
SMALL_ROUNDS = [  # sampling and evaluation in SPA's and PLE's rounds
    "sampling.max_new_tokens=16",
    "eval.max_prompts=4",
    "eval.max_new_tokens=16",
    "run.generate_batch_size=4",
]


def scenario_env() -> dict[str, str]:
    """The scenarios' environment: this one on a single CPU device (their meshes are
    1 x 1 x 1), whatever ``XLA_FLAGS`` asks for."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _write_config(path: Path, overrides: list[str]) -> Path:
    from jaxalign.config import load_config, save_config

    save_config(load_config(None, overrides), path)
    return path


def scenario_command(
    name: str, data: Path, model: Path | None = None, overrides: Sequence[str] = ()
) -> list[str]:
    """The command of a built-in scenario, its inputs written under ``data`` (see
    :func:`prepare_data`); ``overrides`` (``key=value``) change a run's config."""
    p = prepare_data(data, model)
    if name == "generate":
        return [
            "jaxalign", "generate", "--model", str(p["model"]),
            "--prompts", str(p["generate_prompts"]), "--out", "{out}/samples.jsonl",
            "--n", "2", "--max-new-tokens", "32", "--batch-size", "2", "--no-progress",
        ]  # fmt: skip
    if name == "dpo":
        return [
            "jaxalign", "dpo", "--pairs", str(p["seed_pairs"]), "--output-dir", "{out}",
            "--save-every", "2", f"model.name={p['model']}", "data.max_prompt_tokens=48",
            "train.epochs=2", *SMALL_TRAINING, *overrides,
        ]  # fmt: skip
    inputs = [
        f"model.name={p['model']}",
        f"data.prompts={p['prompts']}",
        f"data.eval_prompts={p['eval_prompts']}",
        "run.checkpoint_every=1",  # a kill inside a train stage resumes it mid-way
    ]
    if name == "spa":
        run_overrides = inputs + [
            f"data.seed_pairs={p['seed_pairs']}",
            "data.max_prompt_tokens=48",
            "spa.rounds=1",
            "spa.prompts_per_round=[8]",
            "spa.seed_epochs=1",
            "spa.margin_window=8",
        ]
    elif name == "ple":
        run_overrides = inputs + [
            "run.algorithm=ple",
            "data.max_prompt_tokens=96",
            "ple.iterations=2",
            "ple.reward=demo-checker",
            "ple.reward_range=[0, 2]",
            "ple.sft_weighting=softmax",  # a random model scores 0: "reward" weights are 0
            "ple.lora_rank=2",
        ]
    else:
        raise ValueError(f"no scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    config = _write_config(
        data / f"{name}.yaml", [*run_overrides, *SMALL_TRAINING, *SMALL_ROUNDS, *overrides]
    )
    return ["jaxalign", "run", "--config", str(config), "run.output_dir={out}"]


SCENARIOS = ("generate", "dpo", "spa", "ple")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], help="a built-in command")
    parser.add_argument("--kills", type=int, default=3, help="K: SIGKILL moments (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--workdir", type=Path, default=Path("runs/chaos"))
    parser.add_argument(
        "command", nargs="*", help="a command writing into {out} (after --), unless --scenario"
    )
    args = parser.parse_args(argv)
    if bool(args.scenario) == bool(args.command):
        parser.error("give --scenario or a command after --, not both")
    workdir = args.workdir.absolute()
    if args.scenario:
        names = SCENARIOS if args.scenario == "all" else (args.scenario,)
        runs = {n: scenario_command(n, workdir / "data") for n in names}
    else:
        runs = {"command": args.command}
    reports = {}
    for name, command in runs.items():
        print(f"[chaos] {name}: {shlex.join(command)}", file=sys.stderr, flush=True)
        env = scenario_env() if args.scenario else None
        report = chaos(command, workdir / name, kills=args.kills, seed=args.seed, env=env)
        reports[name] = {"scenario": name, **report} if args.scenario else report
        print(f"[chaos] {name}: pass={report['pass']}", file=sys.stderr, flush=True)
    result = reports if args.scenario else reports["command"]
    text = json.dumps(result, indent=1)
    (workdir / "report.json").write_text(text + "\n")
    print(text)
    return 0 if all(r["pass"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's jaxalign, as the runs use
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # restoring checkpoints to compare them
    sys.exit(main())
