"""Run directories on local disks and object stores (``gs://``) through the stage machinery."""

import json
import os
import pathlib

import pytest
from etils import epath

from jaxalign.algorithms import rounds


def test_run_path_keeps_urls_whole_and_local_paths_plain():
    remote = rounds.run_path("gs://bucket/runs/a")
    assert isinstance(remote, epath.Path) and os.fspath(remote / "x") == "gs://bucket/runs/a/x"
    assert str(pathlib.Path("gs://bucket/runs/a")) == "gs:/bucket/runs/a"  # what we avoid
    assert type(rounds.run_path("runs/a")) is type(pathlib.Path("runs/a"))


def test_local_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "d" / "a.jsonl"
    assert rounds.atomic_write_jsonl(path, [{"x": 1}, {"x": "é"}]) == 2
    rounds.atomic_write_jsonl(path, [{"x": 2}])
    assert rounds.read_jsonl(path) == [{"x": 2}]
    assert [p.name for p in path.parent.iterdir()] == ["a.jsonl"]


def test_the_epath_write_path_on_a_local_directory(tmp_path):
    path = epath.Path(tmp_path) / "sub" / "a.jsonl"
    rounds.atomic_write_jsonl(path, [{"x": 1}, {"x": "é"}])
    assert (tmp_path / "sub" / "a.jsonl").read_text(encoding="utf-8") == '{"x": 1}\n{"x": "é"}\n'
    assert rounds.read_jsonl(path) == [{"x": 1}, {"x": "é"}]
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        rounds.read_jsonl(epath.Path(tmp_path) / "bad.jsonl")


def test_a_run_directory_on_gs_resumes_from_its_state(gcs_bucket):
    """RoundRunner, atomic writes and read_jsonl on gs:// through etils.epath and gcsfs."""
    calls = []

    def sample(out):
        calls.append(os.fspath(out))
        path = out / "candidates.jsonl"
        rounds.atomic_write_jsonl(path, [{"id": 1, "text": "a"}])
        return {"candidates": os.fspath(path)}

    runner = rounds.RoundRunner("gs://bucket/runs/spa", {"a": 1}, log=lambda m: None)
    result = runner.stage(1, "sample", sample)
    assert result == {"candidates": "gs://bucket/runs/spa/round_1/candidates.jsonl"}
    assert calls == ["gs://bucket/runs/spa/round_1"]
    assert rounds.read_jsonl(result["candidates"]) == [{"id": 1, "text": "a"}]
    # The objects sit in the bucket, as the server itself lists them.
    names = gcs_bucket.names()
    assert {"runs/spa/config.yaml", "runs/spa/state.json"} <= set(names)
    assert "runs/spa/round_1/candidates.jsonl" in names
    assert gcs_bucket.read("runs/spa/round_1/candidates.jsonl") == b'{"id": 1, "text": "a"}\n'
    state = json.loads(gcs_bucket.read("runs/spa/state.json"))
    assert "round_1/sample" in state["stages"]

    again = rounds.RoundRunner("gs://bucket/runs/spa", {"a": 1}, log=lambda m: None)
    assert again.stage(1, "sample", sample) == result and len(calls) == 1
    with pytest.raises(ValueError, match="changed: a"):
        rounds.RoundRunner("gs://bucket/runs/spa", {"a": 2}, log=lambda m: None)


def test_atomic_directory_on_gs_replaces_old_contents(gcs_bucket):
    with rounds.atomic_directory("gs://bucket/model") as d:
        rounds.atomic_write_text(d / "old.txt", "old")
    with rounds.atomic_directory("gs://bucket/model") as d:
        rounds.atomic_write_text(d / "new.txt", "new")
    names = sorted(p.name for p in epath.Path("gs://bucket/model").iterdir())
    assert names == ["new.txt"]
    assert [n for n in gcs_bucket.names() if n.startswith("model/")] == ["model/new.txt"]


def test_metrics_on_gs_keep_every_line(gcs_bucket):
    from jaxalign.report import MetricsWriter

    writer = MetricsWriter("gs://bucket/runs/spa/metrics.jsonl")
    writer.write("round_0/train", 1, {"loss": 0.5})
    writer.write("round_0/train", 2, {"loss": 0.25})
    resumed = MetricsWriter("gs://bucket/runs/spa/metrics.jsonl")  # a rerun appends
    resumed.write("round_1/train", 1, {"loss": 0.125})
    lines = rounds.read_jsonl("gs://bucket/runs/spa/metrics.jsonl")
    assert [(m["tag"], m["step"], m["loss"]) for m in lines] == [
        ("round_0/train", 1, 0.5),
        ("round_0/train", 2, 0.25),
        ("round_1/train", 1, 0.125),
    ]


def test_produce_hands_over_the_value_or_loads_it_back(tmp_path):
    """A stage run now gives its own value; a finished one, the value ``load`` reads back."""
    loads = []

    def train(out):
        (out / "weights.txt").write_text("42")
        return {"weights": os.fspath(out / "weights.txt")}, 42

    def load(result):
        loads.append(result)
        return int(pathlib.Path(result["weights"]).read_text())

    runner = rounds.RoundRunner(tmp_path, {"a": 1}, log=lambda m: None)
    assert runner.produce(0, "train", train, load) == 42 and loads == []
    again = rounds.RoundRunner(tmp_path, {"a": 1}, log=lambda m: None)
    ran = []
    assert again.produce(0, "train", lambda d: ran.append(d) or train(d), load) == 42
    assert not ran and loads == [{"weights": os.fspath(tmp_path / "round_0" / "weights.txt")}]


def test_a_run_resumes_across_settings_that_change_no_result_and_refuses_others(tmp_path):
    RoundRunner = rounds.RoundRunner
    """Progress bars, exports, the compile cache and the run's own path may change between
    a run and its resume (a config written before run.compile_cache existed resumes too);
    any other difference is refused, naming the key."""
    old = {"run": {"progress": True, "output_dir": "a"}, "train": {"learning_rate": 1e-5}}
    RoundRunner(tmp_path, old, log=lambda m: None)
    new = {
        "run": {"progress": False, "output_dir": "b", "export_hf": "all", "compile_cache": True},
        "train": {"learning_rate": 1e-5},
    }
    RoundRunner(tmp_path, new, log=lambda m: None)
    changed = {**new, "train": {"learning_rate": 2e-5}}
    with pytest.raises(ValueError, match=r"different config \(changed: train.learning_rate\)"):
        RoundRunner(tmp_path, changed, log=lambda m: None)


def test_an_option_added_since_a_run_resumes_at_its_default_and_refuses_other_values(tmp_path):
    """A run made before ``spa.lora_rank`` existed resumes with it at its default (the
    behaviour the run had); set to anything else, or changed where the run recorded it,
    the resume is refused."""
    defaults = {"spa": {"lora_rank": 0, "beta": 0.1}}
    old = {"spa": {"beta": 0.1}}
    rounds.RoundRunner(tmp_path, old, log=lambda m: None)
    rounds.RoundRunner(tmp_path, {"spa": {"beta": 0.1, "lora_rank": 0}}, defaults=defaults)
    with pytest.raises(ValueError, match=r"changed: spa.lora_rank\)"):
        rounds.RoundRunner(tmp_path, {"spa": {"beta": 0.1, "lora_rank": 8}}, defaults=defaults)
    with pytest.raises(ValueError, match=r"changed: spa.beta\)"):
        rounds.RoundRunner(tmp_path, {"spa": {"beta": 0.2, "lora_rank": 0}}, defaults=defaults)
    assert rounds.config_differences({"a": 1}, {"a": 1, "b": 2}) == ["b"]  # no defaults given


def test_round_runner_records_each_stage_and_logs_it(tmp_path, monkeypatch):
    """What a stage leaves: its result, its wall time (≥ 0 and within the call), the last
    stage's key, ``state.json`` and ``config.yaml`` as a person reads them; the log lines a
    run prints; a nested run directory and its round folders made as needed."""
    run_dir = tmp_path / "a" / "b" / "run"  # parents do not exist yet
    config = {"run": {"seed": 1}, "model": {"name": "m"}, "data": {"z": 1, "a": 2}}
    lines = []
    clock = [100.0, 102.5004]  # the stage's start and end; later calls see the end
    monkeypatch.setattr(
        rounds.time, "perf_counter", lambda: clock.pop(0) if clock[1:] else clock[0]
    )
    runner = rounds.RoundRunner(run_dir, config, log=lines.append)
    assert runner.round_dir(0) == runner.round_dir(0) == run_dir / "round_0"  # twice is fine
    result = runner.produce(0, "train", lambda d: ({"model": str(d / "model")}, "params"), None)
    assert result == "params"
    state = json.loads((run_dir / "state.json").read_text())
    entry = state["stages"]["round_0/train"]
    assert entry["result"] == {"model": str(run_dir / "round_0" / "model")}
    assert entry["seconds"] == 2.5 and runner.seconds(0, "train") == 2.5
    assert state["last_stage"] == "round_0/train"
    assert (run_dir / "state.json").read_text().startswith('{\n "stages": {\n  "round_0/train"')
    assert lines[0] == "[round_0/train] starting"
    assert lines[1].startswith("[round_0/train] finished in 2.5s (")
    assert "programs compiled in" in lines[1] and "from the cache)" in lines[1]
    # config.yaml keeps the config's own key order (data: z before a)
    text = (run_dir / "config.yaml").read_text()
    assert text.index("run:") < text.index("model:") < text.index("data:")
    assert text.index("z: 1") < text.index("a: 2")
    again = rounds.RoundRunner(run_dir, config, log=lines.append)
    assert again.produce(0, "train", None, lambda r: ("loaded", r)) == ("loaded", entry["result"])
    assert lines[-1] == "[round_0/train] done earlier, skipping"


def test_a_changed_config_names_every_changed_key(tmp_path):
    config = {"run": {"seed": 1}, "train": {"beta": 0.1, "lr": 1.0}}
    rounds.RoundRunner(tmp_path / "run", config, log=lambda m: None)
    changed = {"run": {"seed": 2}, "train": {"beta": 0.2, "lr": 1.0}}
    with pytest.raises(ValueError) as e:
        rounds.RoundRunner(tmp_path / "run", changed, log=lambda m: None)
    assert str(e.value) == (
        f"{tmp_path / 'run'} holds a run made with a different config (changed: run.seed, "
        "train.beta). Resume with the original config, or choose a new run.output_dir."
    )


def test_config_differences_without_defaults_counts_a_missing_key():
    assert rounds.config_differences({"a": 1}, {"a": 1, "b": 2}) == ["b"]
    assert rounds.config_differences({"a": 1}, {"a": 1, "b": 2}, {"b": 2}) == []
    assert rounds.config_differences({"a": 1}, {"a": 1, "b": 3}, {"b": 2}) == ["b"]


def test_read_jsonl_skips_blank_lines_anywhere(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n\n   \n{"x": 2}\n\n')
    assert rounds.read_jsonl(path) == [{"x": 1}, {"x": 2}]


def _as_process(monkeypatch, index: int, count: int = 2, barriers: list | None = None):
    """This process plays process ``index`` of ``count`` (barriers recorded, not waited on)."""
    import jax

    from jaxalign import parallel

    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    record = barriers if barriers is not None else []
    monkeypatch.setattr(parallel, "sync_processes", record.append)
    return record


def test_shared_storage_check_passes_where_process_0_s_token_is_seen(tmp_path, monkeypatch):
    barriers = _as_process(monkeypatch, 0)
    runner = rounds.RoundRunner(tmp_path / "run", {"a": 1})
    assert runner.primary
    assert barriers == [
        "jaxalign-shared-check-written",
        "jaxalign-shared-check-read",
        "jaxalign-run-state-read",  # every process has read state.json before it is written
    ]
    assert not (tmp_path / "run" / ".shared-storage-check").exists()  # process 0 removed it
    assert (tmp_path / "run" / "config.yaml").exists()
    runner.stage(0, "train", lambda d: {})
    assert barriers[-1] == "jaxalign-stage-round_0/train"  # others read the stage after it


def test_shared_storage_check_fails_on_a_process_that_cannot_see_the_run(tmp_path, monkeypatch):
    _as_process(monkeypatch, 1)
    (tmp_path / "run").mkdir()  # a directory of this host's own: process 0 wrote elsewhere
    with pytest.raises(RuntimeError) as err:
        rounds.RoundRunner(tmp_path / "run", {"a": 1})
    assert str(err.value) == (
        f"process 1 cannot see {tmp_path / 'run'} as process 0 wrote it; a multi-host run "
        "needs run.output_dir on storage every host shares (a gs:// bucket or a network "
        "file system)"
    )
    assert not (tmp_path / "run" / "config.yaml").exists()  # a secondary writes nothing


def test_shared_storage_check_passes_on_a_process_that_sees_the_token(tmp_path, monkeypatch):
    _as_process(monkeypatch, 1)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".shared-storage-check").write_text("token")  # process 0's, on shared storage
    runner = rounds.RoundRunner(run, {"a": 1})
    assert not runner.primary
    assert (run / ".shared-storage-check").exists()  # only process 0 removes it
    assert not (run / "config.yaml").exists() and not (run / "round_1").exists()
    runner.round_dir(1)
    assert not (run / "round_1").exists()  # process 0 makes the round directories


def test_a_failed_local_write_removes_its_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    rounds.atomic_write_text(path, "old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        rounds.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_local_write_makes_missing_parent_directories(tmp_path):
    path = tmp_path / "x" / "y" / "z.txt"
    rounds.write_bytes(path, b"data")
    assert path.read_bytes() == b"data"
    rounds.write_bytes(path, b"more")  # the directories exist now: no error
    assert path.read_bytes() == b"more"


def test_a_sampling_stage_records_its_decoding_and_logs_it(tmp_path):
    from jaxalign import throughput

    lines = []
    runner = rounds.RoundRunner(tmp_path / "run", {"a": 1}, log=lines.append)

    def sample(round_dir):
        throughput.record_decoding(30, 48, 2.0, compiled=False)
        throughput.record_decoding(10, 16, 0.5, compiled=True)
        return {"n": 2}

    assert runner.stage(1, "sample", sample) == {"n": 2}
    assert runner.stage(1, "judge", lambda d: {"n": 3}) == {"n": 3}
    stages = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    decoding = stages["round_1/sample"]["decoding"]
    assert decoding["sampled_tokens"] == 40 and decoding["decoded_tokens"] == 64
    assert decoding["warm_decoded_tokens"] == 48
    assert "decoding" not in stages["round_1/judge"]  # nothing decoded, no record
    assert lines[2] == (
        "[round_1/sample] decoded 40 response tokens (16/s) in 64 row steps (26/s; rows that "
        "ended early decode on until their batch shrinks or ends)"
    )
    assert not any("decoded" in line for line in lines[3:])


def test_a_judging_stage_records_its_scoring_and_logs_it(tmp_path, monkeypatch):
    from jaxalign import throughput

    lines = []
    runner = rounds.RoundRunner(tmp_path / "run", {"a": 1}, log=lines.append)
    monkeypatch.setattr(runner, "peak_flops", lambda: 1e12)

    def judge(round_dir):
        throughput.record_scoring(10, 600, 800, 2e11, 0.5)  # 0.4 TFLOP/s warm
        throughput.record_scoring(6, 200, 200, 5e11, 1.5, compiled=True)
        return {"n": 1}

    assert runner.stage(1, "judge", judge) == {"n": 1}
    assert runner.stage(1, "train", lambda d: {"n": 2}) == {"n": 2}
    stages = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    scoring = stages["round_1/judge"]["scoring"]
    assert scoring == {
        "scored_sequences": 16,
        "scored_tokens": 800,
        "scored_positions": 1000,
        "scoring_seconds": 2.0,
        "warm_scoring_seconds": 0.5,
        "scored_sequences_per_second": 8.0,
        "scored_tokens_per_second": 400.0,
        "padding": 0.2,
        "warm_model_tflops_per_second": 0.4,
        "warm_mfu": 0.4,
    }
    assert "scoring" not in stages["round_1/train"]  # nothing scored, no record
    assert lines[2] == (
        "[round_1/judge] scored 16 sequences (8.0/s, 400 tokens/s, padding 20%), 0.40 of peak"
    )
    assert not any("scored" in line for line in lines[3:])


def test_finish_run_writes_the_summary_of_every_stage(tmp_path):
    """summary.json: the rows under their key, the invocation's seconds, every stage's wall
    time, the compile counts of stages that recorded them and the decoding of sampling
    stages; summary.md: the title and the table; the table is logged."""
    lines = []
    runner = rounds.RoundRunner(tmp_path / "run", {"run": {"seed": 1}}, log=lines.append)
    runner.state["stages"] = {
        "round_0/train": {
            "result": {},
            "seconds": 2.5,
            "compiles": 3,
            "compile_seconds": 1.25,
            "compile_cache_hits": 1,
            "extra": 9,
        },
        "round_1/sample": {
            "result": {},
            "seconds": 4.0,
            "compiles": 0,
            "compile_seconds": 0.0,
            "compile_cache_hits": 0,
            "decoding": {"sampled_tokens": 7},
        },
        "round_1/judge": {"result": {}, "seconds": 0.5},  # an older run's stage: no counts
        "round_2/eval": {"result": {}, "seconds": 0.25, "scoring": {"scored_sequences": 8}},
    }
    rows = [{"round": 0, "win": 0.5}, {"round": 1, "win": 0.75}]
    summary = rounds.finish_run(
        runner, rows, "| round |\n|---|", title="SPA run", rows_key="rounds", seconds=12.5
    )
    assert summary == {
        "rounds": rows,
        "seconds_this_invocation": 12.5,
        "stage_seconds": {
            "round_0/train": 2.5,
            "round_1/sample": 4.0,
            "round_1/judge": 0.5,
            "round_2/eval": 0.25,
        },
        "stage_compiles": {
            "round_0/train": {"compiles": 3, "compile_seconds": 1.25, "compile_cache_hits": 1},
            "round_1/sample": {"compiles": 0, "compile_seconds": 0.0, "compile_cache_hits": 0},
        },
        "stage_decoding": {"round_1/sample": {"sampled_tokens": 7}},
        "stage_scoring": {"round_2/eval": {"scored_sequences": 8}},
    }
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert (tmp_path / "run" / "summary.json").read_text().startswith('{\n "rounds": [\n  {')
    assert (tmp_path / "run" / "summary.md").read_text() == "# SPA run\n\n| round |\n|---|\n"
    assert lines[-1] == "\n| round |\n|---|"
    assert runner.seconds(1, "judge") == 0.5 and runner.seconds(2, "judge") is None


@pytest.mark.parametrize(
    ("path", "missing", "needed"),
    [
        ("gs://b/run", {"gcsfs", "tensorflow"}, "gcsfs"),
        ("gcs://b/run", {"gcsfs", "tensorflow"}, "gcsfs"),
        ("s3://b/run", {"s3fs", "tensorflow"}, "s3fs"),
        ("gs://b/odd://name", {"gcsfs", "tensorflow"}, "gcsfs"),  # the scheme is the first
    ],
)
def test_a_url_without_its_file_system_package_fails_naming_what_to_install(
    monkeypatch, path, missing, needed
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    with pytest.raises(ValueError) as e:
        rounds.require_file_system(path, what="eval.output")
    scheme = path.split("://")[0]
    extra = " (the 'gcs' extra: pip install 'jaxalign[gcs]'; 'tpu' includes it)"
    assert str(e.value) == (
        f"eval.output={path}: {scheme}:// needs the {needed} package, which is not installed; "
        f"pip install {needed}{extra if needed == 'gcsfs' else ''} on every machine"
    )
    with pytest.raises(ValueError, match=rf"^run\.output_dir={path}: "):  # the default key
        rounds.require_file_system(path)


def test_a_url_whose_file_system_can_be_reached_passes(monkeypatch):
    import importlib.util

    seen = []
    real = importlib.util.find_spec

    def find_spec(name, *args):
        seen.append(name)
        return None if name == "gcsfs" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    rounds.require_file_system("runs/local")  # a local path: nothing looked up
    rounds.require_file_system("file:///tmp/x")  # a scheme with no package to ask for
    rounds.require_file_system("hf://a/b")
    assert seen == []
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "tensorflow" else None
    )
    rounds.require_file_system("gs://b/run")  # no gcsfs, but TensorFlow's gfile serves
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "s3fs" else None
    )
    rounds.require_file_system("s3://b/run")  # its own package is there
    assert rounds.is_remote("gs://b") and rounds.is_remote(pathlib.Path("a")) is False


def test_a_local_write_s_temporary_is_beside_its_target(tmp_path, monkeypatch):
    """The rename that publishes a file is atomic only within one file system, so the
    temporary file is made in the target's own directory."""
    moves = []
    real = os.replace
    monkeypatch.setattr(rounds.os, "replace", lambda a, b: (moves.append((a, b)), real(a, b)))
    rounds.atomic_write_text(tmp_path / "d" / "a.txt", "x")
    ((src, dst),) = moves
    assert pathlib.Path(src).parent == pathlib.Path(dst).parent == tmp_path / "d"


def test_the_epath_write_path_makes_nested_directories_and_writes_again(tmp_path):
    path = epath.Path(tmp_path) / "x" / "y" / "a.txt"
    rounds.write_bytes(path, b"one")
    rounds.write_bytes(path, b"two")  # the directories exist now
    assert (tmp_path / "x" / "y" / "a.txt").read_bytes() == b"two"


def test_done_and_result_read_the_recorded_stages(tmp_path):
    runner = rounds.RoundRunner(tmp_path / "run", {"a": 1}, log=lambda m: None)
    assert not runner.done(2, "judge")
    runner.stage(2, "judge", lambda d: {"pairs": 7})
    assert runner.done(2, "judge") and not runner.done(1, "judge") and not runner.done(2, "x")
    assert runner.result(2, "judge") == {"pairs": 7}
    with pytest.raises(KeyError):
        runner.result(3, "judge")
    again = rounds.RoundRunner(tmp_path / "run", {"a": 1}, log=lambda m: None)
    assert again.done(2, "judge") and again.result(2, "judge") == {"pairs": 7}
