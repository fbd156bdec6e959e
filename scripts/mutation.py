"""Mutation testing of the numerical core and the judges, module by module, with mutmut.

    pip install -e ".[test]"                       # brings mutmut
    python scripts/mutation.py                     # every module below (about an hour, 2 cores)
    python scripts/mutation.py losses judging      # some of them
    python scripts/mutation.py --list              # the modules and the tests each runs
    python scripts/mutation.py refinement --only '*x_push_margins__*'   # some functions' mutants
    python scripts/mutation.py spa --sample 80     # 80 of the module's mutants, drawn at random

For each module, mutmut mutates a copy of the package (operators, constants, defaults,
strings, returned values ...) and runs, for every mutant, the tests of the module's test
files that reach the mutated function. A mutant is *killed* when a test fails (or runs out
of its CPU-time budget, counted apart as ``timeout``), *survived* when every test passes.
Each survivor is listed with its diff, unless ``tests/mutation_equivalents.txt`` names it as
equivalent (the same behaviour written differently) with a reason. Writes
``OUT/mutation.json`` and ``OUT/mutation.md`` (default ``runs/mutation``); exits 1 when a
non-equivalent mutant survives.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# module -> the test files whose tests may kill its mutants (fast, independent references)
MODULES: dict[str, tuple[str, list[str]]] = {
    "losses": ("jaxalign/losses.py", ["tests/test_losses.py"]),
    "judging": ("jaxalign/judging.py", ["tests/test_judging.py"]),
    "refinement": ("jaxalign/refinement.py", ["tests/test_refinement.py"]),
    "enhancement": ("jaxalign/enhancement.py", ["tests/test_enhancement.py"]),
    "pairs": ("jaxalign/data/pairs.py", ["tests/test_data_pairs.py"]),
    "rounds": ("jaxalign/algorithms/rounds.py", ["tests/test_rounds.py"]),
    # the stage modules and the step: their tests run a tiny model, seconds per mutant, and
    # they have 850-1,550 mutants each; --only picks functions for a run that fits an hour
    "spa": (
        "jaxalign/algorithms/spa.py",
        ["tests/test_spa_stages.py", "tests/test_spa.py", "tests/test_spa_lora.py"],
    ),
    "ple": ("jaxalign/algorithms/ple.py", ["tests/test_ple_stages.py", "tests/test_ple.py"]),
    "training": ("jaxalign/training.py", ["tests/test_training.py"]),
}
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.txt"

# Prints every mutant name of one file, as mutmut names them (``pkg.mod.x_fn__mutmut_3``,
# ``pkg.mod.xǁClassǁmethod__mutmut_3``): run in the scratch copy, where the config is.
_LIST_MUTANTS = """
import collections, sys
import libcst as cst
from mutmut.mutation.file_mutation import create_mutations
path = sys.argv[1]
module, mutations, _, _ = create_mutations(path, open(path).read())
owner = {}
for node in module.body:
    if isinstance(node, cst.ClassDef):
        for item in node.body.body:
            if isinstance(item, cst.FunctionDef):
                owner[id(item)] = node.name.value
prefix = path[:-3].replace("/", ".")
seen = collections.Counter()
for m in mutations:
    fn = m.contained_by_top_level_function
    if not isinstance(fn, cst.FunctionDef):
        continue  # module- or class-level code: mutmut does not test it
    cls = owner.get(id(fn))
    name = f"x\u01c1{cls}\u01c1{fn.name.value}" if cls else f"x_{fn.name.value}"
    seen[name] += 1
    print(f"{prefix}.{name}__mutmut_{seen[name]}")
"""


def mutant_names(work: pathlib.Path, source: str) -> list[str]:
    """Every mutant name of ``source``, listed in the scratch copy ``work``."""
    return subprocess.run(
        [sys.executable, "-c", _LIST_MUTANTS, source],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


# mutmut's exit codes of a mutant's test run (mutmut.stats)
KILLED = {1, 3}
TIMEOUT = {24, -24, 152, 255, 36}
SURVIVED = {0}
NO_TESTS = {5, 33}


def equivalents() -> dict[str, str]:
    """``name  reason`` lines of tests/mutation_equivalents.txt (``#`` starts a comment)."""
    out = {}
    if EQUIVALENTS.exists():
        for line in EQUIVALENTS.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, reason = line.partition(" ")
                out[name] = reason.strip()
    return out


def _tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "jaxalign", "tests", "configs", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()


def run_module(
    name: str, jobs: int, log, only: tuple[str, ...] = (), sample: int = 0, seed: int = 0
) -> dict:
    """Mutates one module in a scratch copy of the repository; returns its counts and survivors.

    ``only``: mutant-name patterns (``fnmatch``, e.g. ``*push_margins*``); when given, only
    the matching mutants are tested and counted. ``sample``: test that many mutants drawn
    at random (with ``seed``) instead of all of them (or all that ``only`` matches)."""
    source, tests = MODULES[name]
    with tempfile.TemporaryDirectory(prefix=f"mutation_{name}_") as scratch:
        work = pathlib.Path(scratch)
        for rel in _tracked_files():
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target, follow_symlinks=False)  # jaxalign/configs
        with (work / "pyproject.toml").open("a") as f:
            f.write(
                "\n[tool.mutmut]\n"
                f"source_paths = [{json.dumps(source)}]\n"
                f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
                'also_copy = ["jaxalign", "tests"]\n'
                # JAX's runtime is not fork-safe: a worker forked from a process that has
                # run XLA waits forever on its thread pools. mutmut's fork server keeps
                # the forking process free of anything but imports and collection.
                'process_isolation = "forkserver"\n'
            )
        start = time.time()
        total = None
        if sample:
            drawn = mutant_names(work, source)
            if only:
                drawn = [k for k in drawn if any(fnmatch.fnmatch(k, p) for p in only)]
            total = len(drawn)
            only = tuple(sample_mutants_from(drawn, sample, seed))
            log(f"{name}: testing {len(only)} of its {total} mutants, drawn at random")
        log(f"{name}: mutating {source}; tests {', '.join(tests)}")
        env = {**os.environ, "JAXALIGN_COMPILE_CACHE": "0"}
        result = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *only],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        meta = work / "mutants" / f"{source}.meta"
        if not meta.exists():
            raise SystemExit(
                f"{name}: mutmut wrote no results (exit {result.returncode}):\n"
                f"{result.stderr[-2000:]}"
            )
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes and all(c is None for c in codes.values()):
            raise SystemExit(
                f"{name}: mutmut tested no mutant (exit {result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
            )
        if only:
            codes = {k: c for k, c in codes.items() if any(fnmatch.fnmatch(k, p) for p in only)}
        known = equivalents()
        survivors, equivalent = [], []
        for key, code in sorted(codes.items()):
            if code in SURVIVED:
                if key in known:
                    equivalent.append({"mutant": key, "reason": known[key]})
                else:
                    diff = subprocess.run(
                        [sys.executable, "-m", "mutmut", "show", key],
                        cwd=work,
                        capture_output=True,
                        text=True,
                    ).stdout
                    lines = [
                        ln
                        for ln in diff.splitlines()
                        if ln[:1] in "+-" and not ln.startswith(("+++", "---"))
                    ]
                    survivors.append({"mutant": key, "diff": lines})
        counts = {
            "mutants": len(codes),
            "killed": sum(c in KILLED for c in codes.values()),
            "timeout": sum(c in TIMEOUT for c in codes.values()),
            "survived": len(survivors),
            "equivalent": len(equivalent),
            "no_tests": sum(c in NO_TESTS for c in codes.values()),
            "not_checked": sum(c is None for c in codes.values()),
        }
        counts["other"] = counts["mutants"] - sum(v for k, v in counts.items() if k != "mutants")
        detected = counts["killed"] + counts["timeout"]
        counts["score"] = detected / max(counts["mutants"] - counts["equivalent"], 1)
        if total is not None:
            counts["sampled_from"] = total
            counts["score_interval"] = wilson(detected, counts["mutants"] - counts["equivalent"])
        log(f"{name}: {json.dumps(counts)} in {time.time() - start:.0f} s")
        return {
            "module": source,
            "tests": tests,
            "only": list(only),
            **counts,
            "seconds": round(time.time() - start),
            "survivors": survivors,
            "equivalents": equivalent,
        }


def sample_mutants_from(names: list[str], size: int, seed: int) -> list[str]:
    """``size`` of ``names`` drawn uniformly without replacement: a module with thousands of
    mutants whose tests take seconds each is scored on a random sample, whose score
    estimates the whole module's (reported with a 95% interval)."""
    return sorted(random.Random(seed).sample(names, min(size, len(names))))


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson 95% interval of a proportion ``hits / n`` (a sampled mutation score)."""
    if n <= 0:
        return [0.0, 1.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return [round(max(centre - half, 0.0), 4), round(min(centre + half, 1.0), 4)]


def markdown(results: list[dict]) -> str:
    rows = [
        "| module | mutants | killed | timeout | equivalent | survived | no tests | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['timeout']} | "
            f"{r['equivalent']} | {r['survived']} | {r['no_tests']} | {r['score']:.1%} |"
        )
    for r in results:
        if "sampled_from" in r:
            low, high = r["score_interval"]
            rows.append(
                f"\n`{r['module']}`: {r['mutants']} of {r['sampled_from']} mutants drawn at "
                f"random; score {r['score']:.1%}, 95% interval [{low:.1%}, {high:.1%}]"
            )
    for r in results:
        for s in r["survivors"]:
            rows.append(f"\n`{s['mutant']}` survived:\n```diff\n" + "\n".join(s["diff"]) + "\n```")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {', '.join(MODULES)}")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--out", default="runs/mutation", help="where the report goes")
    parser.add_argument("--list", action="store_true", help="show the modules and their tests")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="test only the mutants whose names match (fnmatch, repeatable), "
        "e.g. --only '*push_margins*'",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="test N mutants drawn at random (of those --only matches) and report the "
        "score with a 95%% interval",
    )
    parser.add_argument("--seed", type=int, default=0, help="the --sample draw's seed")
    args = parser.parse_args(argv)
    if args.list:
        for name, (source, tests) in MODULES.items():
            print(f"{name:12} {source:34} {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    if args.sample < 0:
        parser.error(f"--sample must be at least 0, got {args.sample}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if shutil.which("mutmut") is None and not _has_mutmut():
        raise SystemExit('mutmut is not installed: pip install -e ".[test]"')

    def log(message):
        print(f"[mutation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for module in args.modules or list(MODULES):
        results.append(run_module(module, args.jobs, log, tuple(args.only), args.sample, args.seed))
        (out / "mutation.json").write_text(json.dumps(results, indent=1) + "\n")  # as it goes
        (out / "mutation.md").write_text(markdown(results))
    print(
        json.dumps(
            [{k: v for k, v in r.items() if k not in ("survivors", "equivalents")} for r in results]
        )
    )
    return 1 if any(r["survived"] for r in results) else 0


def _has_mutmut() -> bool:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
