"""The benchmarks' own behaviour (not their timings): a missing peer stops the benchmark
with the install command instead of timing something else."""

import os
import pathlib
import shutil
import subprocess
import sys

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
