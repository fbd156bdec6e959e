"""``jaxalign run``'s checks before any work: ``--dry-run``, the multi-process variables and
the file system of a ``gs://`` output directory."""

from __future__ import annotations

import importlib.util

import pytest

from jaxalign import cli

CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_NUM_SLICES",
)


@pytest.fixture
def no_cluster(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_dry_run_prints_the_plan_and_runs_nothing(no_cluster, capsys, tmp_path):
    out = tmp_path / "never"
    code = cli.main(
        [
            "run",
            "--dry-run",
            "--config",
            "configs/spa_zephyr7b_ultrafeedback.yaml",
            f"run.output_dir={out}",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[0] == "jaxalign run --dry-run: configs/spa_zephyr7b_ultrafeedback.yaml, nothing run"
    )
    assert [line.strip() for line in printed[1:]] == [
        "processes: 1 (no jax.distributed)",
        "algorithm: spa",
        "model: /data/zephyr-7b-sft-full",
        f"output: {out}",
        "mesh: data=1 fsdp=-1 tensor=1",
    ]
    assert not out.exists()


def test_dry_run_shows_the_processes_the_jax_variables_give(no_cluster, capsys):
    no_cluster.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:8476")
    no_cluster.setenv("JAX_NUM_PROCESSES", "2")
    no_cluster.setenv("JAX_PROCESS_ID", "1")
    assert cli.main(["run", "--dry-run"]) == 0
    assert "processes: 2, this is process 1, coordinator 10.0.0.2:8476" in capsys.readouterr().out


def test_incomplete_variables_stop_the_run_with_what_to_set(no_cluster, capsys):
    no_cluster.setenv("JAX_NUM_PROCESSES", "2")
    for argv in (["run", "--dry-run"], ["run"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxalign run: JAX_NUM_PROCESSES=2 is set but")
        assert "JAX_PROCESS_ID (0, 1, ..., a different one on each)" in err


def test_gs_output_dir_without_gcsfs_is_refused_with_the_install_line(no_cluster, capsys):
    real = importlib.util.find_spec
    missing = {"gcsfs", "tensorflow"}
    no_cluster.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    assert cli.main(["run", "--dry-run", "run.output_dir=gs://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "run.output_dir=gs://bucket/run: gs:// needs the gcsfs package" in err
    assert "pip install 'jaxalign[gcs]'" in err
    # With gcsfs (installed here) the same command passes.
    no_cluster.setattr(importlib.util, "find_spec", real)
    assert cli.main(["run", "--dry-run", "run.output_dir=gs://bucket/run"]) == 0
