"""Two processes x four CPU devices behave as one process with eight devices.

Each test starts two Python processes that join one JAX runtime through
``jax.distributed`` on 127.0.0.1 (CPU collectives: gloo, JAX's default) and
compares what they compute with the same computation in this 8-device pytest
process. Run as a script, this file is the worker those processes execute.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve()
PROCESSES = 2
LAUNCH_TIMEOUT_S = 420


# ----------------------------------------------------------------------------- the computations


def _tiny_config():
    from jaxalign.models.llama import ModelConfig

    return ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=True,
    )


def flat_params(tree) -> dict[str, np.ndarray]:
    """Parameters by slash-joined name (``layers/attn/q_proj/kernel``) as numpy arrays; an
    nnx state read back from orbax (each leaf under a ``value`` key) gives the same names."""
    import jax
    from flax import nnx

    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return {
        "/".join(str(getattr(k, "key", k)) for k in path).removesuffix("/value"): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _pair_batch(seed: int, rows: int = 8, width: int = 16) -> dict[str, np.ndarray]:
    """Right-padded random pairs with precomputed reference log-probs and mixed weights."""
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(1, 96, (rows, width)).astype(np.int32)
        lengths = rng.integers(6, width + 1, rows)
        prompts = rng.integers(2, 6, rows)
        cols = np.arange(width)[None]
        attention = (cols < lengths[:, None]).astype(np.int32)
        out[f"{side}_ids"] = ids * attention
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_loss_mask"] = (attention * (cols >= prompts[:, None])).astype(np.int32)
        out[f"ref_{side}_logps"] = rng.normal(-40, 3, rows).astype(np.float32)
    out["weight"] = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    out["weight"][-1] = 0.0  # a padding pair
    out["smoothing"] = rng.uniform(0, 0.2, rows).astype(np.float32)
    return out


def train_steps(checkpoint_dir: str | None = None) -> dict[str, np.ndarray]:
    """Two DPO steps of a tiny model on a (data=2, fsdp=2, tensor=2) mesh.

    Every process feeds only its own rows of each batch. With ``checkpoint_dir``
    the final state is also saved with orbax, restored, and checked to round-trip.
    Returns the losses and the trained parameters, gathered to host memory.
    """
    import jax
    from flax import nnx

    from jaxalign import checkpoint, parallel, training
    from jaxalign.models.llama import Transformer

    mesh = parallel.make_mesh(2, 2, 2)
    config = training.TrainConfig(
        learning_rate=1e-2, warmup_ratio=0.0, schedule="constant", batch_size=8
    )
    model = Transformer(_tiny_config(), rngs=nnx.Rngs(0))
    graphdef, state, shardings = training.create_train_state(model, config, 2, mesh)
    step = training.make_train_step(
        graphdef, config, mesh, training.dpo_loss_fn(config), shardings, total_steps=2
    )
    losses, accuracies = [], []
    for seed in (1, 2):
        full = _pair_batch(seed)
        mine = parallel.process_rows(mesh, 8)
        batch = parallel.make_global_batch({k: v[mine] for k, v in full.items()}, mesh, 8)
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
        accuracies.append(float(metrics["rewards/accuracy"]))
    params = parallel.tree_to_host(state.params)
    if checkpoint_dir is not None:
        with checkpoint.Checkpointer(checkpoint_dir, async_=True) as ckpt:
            ckpt.save(2, state, {"step": 2})
            ckpt.wait()
            restored, extra = ckpt.restore(target_state=state, shardings=shardings)
        assert extra == {"step": 2}
        same = jax.tree.map(
            lambda a, b: bool(np.array_equal(a, b)),
            parallel.tree_to_host(restored.params),
            params,
        )
        assert all(jax.tree.leaves(same)), "orbax restore differs from the saved state"
    flat = flat_params(params)
    return {"losses": np.array(losses), "accuracies": np.array(accuracies), **flat}


def spa_config(root: pathlib.Path, out: pathlib.Path, *extra: str):
    """A one-round SPA run on the tiny model over a (2, 2, 2) mesh, without evaluation."""
    from jaxalign.config import load_config

    return load_config(
        None,
        [
            f"model.name={root / 'model'}",
            f"data.seed_pairs={root / 'seed.jsonl'}",
            f"data.prompts={root / 'prompts.jsonl'}",
            f"data.eval_prompts={root / 'eval.jsonl'}",
            "data.max_prompt_tokens=48",
            "data.max_response_tokens=16",
            "sampling.max_new_tokens=16",
            "train.batch_size=4",
            "train.learning_rate=1e-3",
            "train.logp_chunk_size=32",
            "spa.rounds=1",
            "spa.prompts_per_round=[8]",
            "spa.seed_epochs=1",
            "spa.margin_window=8",
            "eval.enabled=false",
            "eval.max_prompts=4",
            "eval.max_new_tokens=16",
            "run.generate_batch_size=4",
            "run.progress=false",
            "run.mesh.data=2",
            "run.mesh.fsdp=2",
            "run.mesh.tensor=2",
            f"run.output_dir={out}",
            *extra,
        ],
    )


def ple_config(root: pathlib.Path, out: pathlib.Path, *extra: str):
    """One PLE iteration (with an SFT stage) on the tiny model over a (2, 2, 2) mesh."""
    from jaxalign.config import load_config

    return load_config(
        None,
        [
            "run.algorithm=ple",
            f"model.name={root / 'model'}",
            f"data.prompts={root / 'prompts.jsonl'}",
            f"data.eval_prompts={root / 'eval.jsonl'}",
            "data.max_prompt_tokens=64",
            "data.max_response_tokens=16",
            "sampling.max_new_tokens=16",
            "train.batch_size=4",
            "train.learning_rate=1e-2",
            "train.logp_chunk_size=32",
            "ple.iterations=1",
            "ple.prompts_per_iteration=4",
            f"ple.sft_data={root / 'seed4.jsonl'}",
            "ple.reward=demo-checker",
            "ple.reward_range=[0, 2]",
            "ple.sft_weighting=softmax",
            "ple.lora_rank=2",
            "run.export_hf=none",
            "eval.enabled=false",
            "run.generate_batch_size=4",
            "run.progress=false",
            "run.mesh.data=2",
            "run.mesh.fsdp=2",
            "run.mesh.tensor=2",
            f"run.output_dir={out}",
            *extra,
        ],
    )


class CharTokenizer:
    """One id per character (``ord % 96``, within the tiny model's vocabulary); BOS 1, EOS 2."""

    pad_token_id = 0

    def encode_prompt(self, prompt, use_chat_template=True):
        return [1] + [3 + ord(c) % 93 for c in prompt]

    def encode_response(self, text, add_eos=True):
        return [3 + ord(c) % 93 for c in text] + ([2] if add_eos else [])


def write_pair_file(path: pathlib.Path) -> pathlib.Path:
    """23 lines: 19 good pairs of two length buckets, a blank line and three bad records."""
    rng = np.random.default_rng(7)
    lines = []
    for i in range(19):
        prompt = "q" * int(rng.integers(2, 6 if i % 3 else 16)) + str(i)
        chosen = "yes" * int(rng.integers(1, 3))
        lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": f"no{i}"}))
        if i == 4:
            lines.append("{not json")
        if i == 9:
            lines.append("")
        if i == 12:
            lines.append(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}))
        if i == 15:
            lines.append(json.dumps({"prompt": "q", "chosen": "x"}))
    path.write_text("\n".join(lines) + "\n")
    return path


DPO_OVERRIDES = [
    "data.max_prompt_tokens=24",
    "data.max_response_tokens=8",
    "data.on_bad_record=skip",
    "train.batch_size=8",
    "train.learning_rate=1e-2",
    "train.warmup_ratio=0.0",
    "train.schedule=constant",
    "train.logp_chunk_size=16",
    "train.epochs=2",
]


def dpo_shard_config(*extra: str):
    from jaxalign.config import load_config

    return load_config(None, [*DPO_OVERRIDES, *extra])


def dpo_cli_overrides(model_dir: str) -> list[str]:
    """``jaxalign dpo``'s overrides for the tiny model (real tokenizer: chat-templated
    prompts are longer) on a (2, 2, 2) mesh."""
    return [
        f"model.name={model_dir}",
        "data.max_prompt_tokens=64",
        "run.mesh.data=2",
        "run.mesh.fsdp=2",
        "run.mesh.tensor=2",
        "run.progress=false",
    ]


def dpo_command_twice(pairs: str, model_dir: str, out_dir: pathlib.Path) -> None:
    """``jaxalign dpo`` as a user runs it on every host, then once more after the
    checkpoints past step 2 are deleted (a run killed after step 2): it must resume."""
    import shutil

    import jax
    from jax.experimental import multihost_utils

    from jaxalign import cli, parallel

    run = out_dir / "run"
    argv = ["dpo", "--pairs", pairs, "--output-dir", str(run), "--save-every", "2"]
    argv += [*DPO_OVERRIDES, *dpo_cli_overrides(model_dir)]
    assert cli.main(argv) == 0
    first = (run / "model").exists()
    multihost_utils.sync_global_devices("first run done")
    if jax.process_index() == 0:
        steps = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
        for step in steps:
            if step > 2:
                shutil.rmtree(run / "checkpoints" / str(step))
        shutil.rmtree(run / "model")
    multihost_utils.sync_global_devices("checkpoints deleted")
    assert cli.main(argv) == 0
    mesh = parallel.make_mesh(2, 2, 2)
    facts = {"process_rows": parallel.process_rows(mesh, 8).tolist(), "first_model": first}
    (out_dir / f"cli_{jax.process_index()}.json").write_text(json.dumps(facts))


def train_dpo(model, batches, config, mesh, **kwargs):
    """`loop.train` with the DPO loss and the config's epochs, quietly."""
    from jaxalign import loop, training

    return loop.train(
        model,
        batches,
        config.train,
        mesh,
        loss_fn=training.dpo_loss_fn(config.train),
        epochs=config.train.epochs,
        progress=False,
        **kwargs,
    )


def dpo_on_host_shares(pairs: pathlib.Path, out_dir: pathlib.Path) -> None:
    """``jaxalign dpo``'s data path on each host: read and tokenise only this host's share,
    agree on the plan, cache its reference log-probs, train on host-local batches."""
    import jax
    from flax import nnx

    from jaxalign import parallel
    from jaxalign.algorithms import dpo
    from jaxalign.data.records import DataError
    from jaxalign.models.llama import Transformer

    config = dpo_shard_config()
    mesh = parallel.make_mesh(2, 2, 2)
    try:  # each host finds another first bad record; all must report the file's first
        dpo.read_host_pairs(str(pairs), mesh, 8, "error")
        error = None
    except DataError as e:
        error = {"message": str(e), "position": e.position}
    records, indices, read_report = dpo.read_host_pairs(str(pairs), mesh, 8, "skip")
    batches, pair_report = dpo.host_pair_batches(records, indices, CharTokenizer(), config, mesh)
    model = Transformer(_tiny_config(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cache = out_dir / dpo.reference_cache_name(host_local=True)
    batches = dpo.reference_logps(graphdef, params, batches, cache, config.train, False)
    result = train_dpo(model, batches, config, mesh, seed=0, host_local=True)
    pid = jax.process_index()
    flat = flat_params(result.params)
    fields = ("index", "ref_chosen_logps", "ref_rejected_logps")
    local = {f"{k}_{i}": b[k] for i, b in enumerate(batches) for k in fields}
    np.savez(out_dir / f"dpo_{pid}.npz", **flat, **local)
    facts = {
        "ids": [r["id"] for r in records],
        "indices": [int(i) for i in indices],
        "read_report": read_report.to_dict(),
        "pair_report": pair_report.to_dict(),
        "process_rows": parallel.process_rows(mesh, 8).tolist(),
        "batches": len(batches),
        "cache": cache.name,
        "error": error,
    }
    (out_dir / f"dpo_{pid}.json").write_text(json.dumps(facts))


# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(task: str, out_dir: pathlib.Path, *args: str) -> None:
    """Runs ``task`` in ``PROCESSES`` worker processes of 4 CPU devices each; fails on any error."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")]),
    )
    procs, logs = [], []
    for pid in range(PROCESSES):
        log = open(out_dir / f"worker_{pid}.log", "w")  # noqa: SIM115
        logs.append(log)
        cmd = [sys.executable, str(HERE), task, str(pid), str(port), str(out_dir), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if codes != [0] * PROCESSES:
        tails = "\n".join(
            f"--- worker {pid} ---\n"
            + "\n".join((out_dir / f"worker_{pid}.log").read_text().splitlines()[-30:])
            for pid in range(PROCESSES)
        )
        pytest.fail(f"workers exited with {codes} (None: timed out)\n{tails}")


def _worker(task: str, pid: int, port: int, out_dir: pathlib.Path, args: list[str]) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=pid
    )
    assert jax.process_count() == PROCESSES and jax.device_count() == 8
    if task == "train":
        result = train_steps(checkpoint_dir=str(out_dir / "checkpoints"))
        np.savez(out_dir / f"train_{pid}.npz", **result)
    elif task == "dpo_shards":
        dpo_on_host_shares(pathlib.Path(args[0]), out_dir)
    elif task == "dpo_cli":
        dpo_command_twice(args[0], args[1], out_dir)
    elif task == "ple":
        from jaxalign.algorithms import ple

        ple.run(ple_config(pathlib.Path(args[0]), out_dir / "run", *args[1:]), log=print)
    elif task == "spa":
        from jaxalign.algorithms import spa

        spa.run(spa_config(pathlib.Path(args[0]), out_dir / "run", *args[1:]), log=print)
    else:
        raise SystemExit(f"unknown task {task!r}")


def join_from_environment(out_dir: pathlib.Path) -> None:
    """What ``jaxalign run`` does first on each machine: ``initialize_distributed()`` with no
    arguments, configured only by the environment; then a cross-process gather."""
    import jax

    from jaxalign import parallel

    assert parallel.initialize_distributed() is True
    facts = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "gathered": parallel.allgather_json({"id": os.environ["JAX_PROCESS_ID"]}),
    }
    (out_dir / f"env_{jax.process_index()}.json").write_text(json.dumps(facts))


# Variables that would tell jax.distributed or jaxalign about a cluster.
_CLUSTER_VAR_PREFIXES = ("JAX_", "SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_")


# ----------------------------------------------------------------------------- tests


def test_train_step_on_two_processes_matches_one_process(tmp_path):
    launch("train", tmp_path)
    expected = train_steps()
    for pid in range(PROCESSES):
        got = dict(np.load(tmp_path / f"train_{pid}.npz"))
        assert sorted(got) == sorted(expected)
        np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5, atol=1e-6)
        for name, value in expected.items():
            # Cross-process sums add in another order; Adam's m/sqrt(v) magnifies that
            # rounding for near-zero gradients, hence an absolute 1e-5 on the parameters.
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    # The steps did train: the embedding moved away from its initial values.
    from flax import nnx

    from jaxalign.models.llama import Transformer

    initial = nnx.state(Transformer(_tiny_config(), rngs=nnx.Rngs(0)))
    start = np.asarray(initial["embed_tokens"][...])
    moved = np.abs(expected["embed_tokens"] - start)
    assert moved.max() > 1e-3


def dpo_on_one_process(pairs, tokenizer, model, config, process_rows):
    """What two hosts' shares of ``pairs`` make, computed in this one 8-device process from
    the pure functions: both shares read, one plan, each host's rows packed and placed as
    ``process_rows[p]`` (the rows worker ``p`` fed) places them, reference log-probs and
    training on a (2, 2, 2) mesh.

    Returns ``(shares, local, batches, params)``: the two ``(records, positions, report)``
    shares, each host's packed batches, the global batches with reference log-probs, and
    the trained parameters by flat name.
    """
    from flax import nnx

    from jaxalign import parallel, scoring
    from jaxalign.data import pairs as pair_data
    from jaxalign.data.records import kept_record_index, read_record_share

    mesh = parallel.make_mesh(2, 2, 2)
    size = config.train.batch_size
    shares = [read_record_share(pairs, "pairs", "skip", shard=(p, 2)) for p in range(2)]
    n = sum(r.read for _, _, r in shares)
    kept = [np.isin(np.arange(p, n, 2), pos) for p, (_, pos, _) in enumerate(shares)]
    index = kept_record_index(kept, n)
    limits = {k: getattr(config.data, k) for k in ("max_prompt_tokens", "max_response_tokens")}
    bucketed = [
        pair_data.bucket_pairs(recs, tokenizer, indices=index[pos], **limits)
        for recs, pos, _ in shares
    ]
    plan = pair_data.plan_pair_batches([r.buckets for _, r in bucketed], size // PROCESSES)
    local = [pair_data.pack_pair_batches(b, plan, size // PROCESSES, 0) for b, _ in bucketed]
    batches = []
    for k in range(len(plan)):
        batch = {}
        for name in local[0][k]:
            value = np.zeros((size, *local[0][k][name].shape[1:]), local[0][k][name].dtype)
            for p in range(PROCESSES):
                value[process_rows[p]] = local[p][k][name]
            batch[name] = value
        batches.append(batch)
    graphdef, params = nnx.split(model)
    batches = scoring.with_reference_logps(graphdef, params, batches, config.train)
    result = train_dpo(model, batches, config, mesh, seed=config.run.seed)
    flat = flat_params(result.params)
    return shares, local, batches, flat


def test_dpo_with_host_shares_matches_one_process_on_the_same_batches(tmp_path):
    """Each host reads and tokenises only its share; training equals one 8-device process
    on the global batches those shares make (built here from the same plan)."""
    from flax import nnx

    from jaxalign.data import pairs as pair_data
    from jaxalign.data.records import DataError, ReadReport, read_record_share
    from jaxalign.models.llama import Transformer

    pairs = write_pair_file(tmp_path / "pairs.jsonl")
    launch("dpo_shards", tmp_path, str(pairs))
    facts = [json.loads((tmp_path / f"dpo_{p}.json").read_text()) for p in range(PROCESSES)]
    got = [dict(np.load(tmp_path / f"dpo_{p}.npz")) for p in range(PROCESSES)]

    # Every record was read by exactly one host, and the reports add up to one host's.
    records, positions, whole = read_record_share(pairs, "pairs", "skip")
    assert whole.skipped == 3 and whole.kept == 19
    ids = [i for f in facts for i in f["ids"]]
    assert sorted(ids) == sorted(r["id"] for r in records) and len(set(ids)) == len(ids)
    reports = [ReadReport.from_dict(f["read_report"]) for f in facts]
    assert reports[0].to_dict() == reports[1].to_dict() == whole.to_dict()  # summed on each
    # With on_bad_record=error every host stops with one host's message: the first bad
    # record of the file, though each share's own first bad record is another one.
    firsts = []
    for share in [None, (0, 2), (1, 2)]:
        with pytest.raises(DataError) as e:
            read_record_share(pairs, "pairs", "error", shard=share)
        firsts.append((str(e.value), e.value.position))
    assert firsts[1] != firsts[2] and firsts[0] in firsts[1:]
    assert [tuple(f["error"].values()) for f in facts] == [firsts[0]] * PROCESSES
    # Global indices name a record as one host would: its place among the kept records.
    for f in facts:
        assert [records[i]["id"] for i in f["indices"]] == f["ids"]
    assert {f["cache"] for f in facts} == {f"reference_logps.process{p}-of-2.npz" for p in (0, 1)}

    # The same plan, built here from the two shares with the pure functions.
    model = Transformer(_tiny_config(), rngs=nnx.Rngs(0))
    initial = np.asarray(nnx.state(model)["embed_tokens"][...]).copy()
    rows = [f["process_rows"] for f in facts]
    _, local, batches, expected = dpo_on_one_process(
        pairs, CharTokenizer(), model, dpo_shard_config(), rows
    )
    assert facts[0]["batches"] == facts[1]["batches"] == len(batches) > 1
    assert sorted(i for b in batches for i in b["index"] if i >= 0) == list(range(19))
    total = pair_data.PairReport.from_dict(facts[0]["pair_report"])
    assert total.kept == 19 and total.padding_pairs == 8 * len(batches) - 19
    for k, batch in enumerate(batches):
        for p in range(PROCESSES):
            # The worker fed exactly these rows, with these reference log-probs.
            np.testing.assert_array_equal(got[p][f"index_{k}"], local[p][k]["index"])
            for side in ("chosen", "rejected"):
                np.testing.assert_allclose(
                    got[p][f"ref_{side}_logps_{k}"],
                    batch[f"ref_{side}_logps"][rows[p]],
                    rtol=1e-5,
                    atol=1e-5,
                )
    assert np.abs(expected["embed_tokens"] - initial).max() > 1e-3
    for p in range(PROCESSES):
        for name, value in expected.items():
            np.testing.assert_allclose(got[p][name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_dpo_command_on_two_processes_resumes_and_matches_one_process(tmp_path, tiny_model_dir):
    """``jaxalign dpo`` end to end on 2 processes (host-local reading, per-process reference
    caches, sharded checkpoints, a resume after a kill) trains what one 8-device process
    trains on the same global batches."""

    from jaxalign.checkpoint import load_params
    from jaxalign.loading import load

    pairs = write_pair_file(tmp_path / "pairs.jsonl")
    launch("dpo_cli", tmp_path, str(pairs), str(tiny_model_dir))
    run = tmp_path / "run"
    facts = [json.loads((tmp_path / f"cli_{p}.json").read_text()) for p in range(PROCESSES)]
    assert all(f["first_model"] for f in facts)
    caches = sorted(x.name for x in run.glob("reference_logps*.npz"))
    assert caches == [f"reference_logps.process{p}-of-2.npz" for p in range(PROCESSES)]
    # The resumed run restarted after step 2 and wrote the metrics on process 0 only.
    logs = [(tmp_path / f"worker_{p}.log").read_text() for p in range(PROCESSES)]
    assert "resuming from step 2 of" in logs[0]
    assert "skipped" in logs[0] and "skipped" not in logs[1]  # the read report: process 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    total = max(steps)
    assert steps == [*range(1, total + 1), *range(3, total + 1)]

    config = dpo_shard_config(*dpo_cli_overrides(str(tiny_model_dir)))
    model, tokenizer = load(str(tiny_model_dir))
    rows = [f["process_rows"] for f in facts]
    _, _, batches, expected = dpo_on_one_process(pairs, tokenizer, model, config, rows)
    assert total == config.train.epochs * len(batches)
    flat = flat_params(load_params(run / "model", None))
    assert sorted(flat) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(flat[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def spa_inputs(tmp_path_factory, tiny_model_dir):
    """The tiny model and small slices of the demo data, as files the workers can read."""
    from jaxalign.data.records import DEMO_FILES

    root = tmp_path_factory.mktemp("spa_inputs")
    (root / "model").symlink_to(tiny_model_dir)
    files = {"seed": 8, "seed4": 4, "prompts": 8, "eval": 4}
    for name, count in files.items():
        key = {"seed": "pairs", "seed4": "pairs"}.get(name, name)
        lines = DEMO_FILES[key].read_text().splitlines()[:count]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _pairs(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "round_1" / "pairs.jsonl").read_text().splitlines()]


def _same_pairs(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        assert {k: g[k] for k in ("id", "chosen", "rejected")} == {
            k: e[k] for k in ("id", "chosen", "rejected")
        }
        np.testing.assert_allclose(
            [g["margin"], g["p"]], [e["margin"], e["p"]], rtol=1e-4, atol=1e-5
        )


def _spa_on_two_processes_matches_one(spa_inputs, tmp_path, *extra):
    from jaxalign.algorithms import spa

    launch("spa", tmp_path, str(spa_inputs), *extra)
    run_dir = tmp_path / "run"
    reference = tmp_path / "reference"
    spa.run(spa_config(spa_inputs, reference, *extra), log=lambda message: None)
    _same_pairs(_pairs(run_dir), _pairs(reference))
    candidates = (run_dir / "round_1" / "candidates.jsonl").read_text()
    assert candidates == (reference / "round_1" / "candidates.jsonl").read_text()
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    assert set(state) == set(json.loads((reference / "state.json").read_text())["stages"])
    # Only process 0 logged: worker 1's log holds no stage messages.
    assert "[round_1/judge] finished" in (tmp_path / "worker_0.log").read_text()
    assert "[round_1/judge]" not in (tmp_path / "worker_1.log").read_text()
    return run_dir, reference


def test_small_spa_round_on_two_processes_gives_the_same_pairs(spa_inputs, tmp_path):
    """Four seed pairs and four prompts: one batch per stage, so few programs to compile."""
    _spa_on_two_processes_matches_one(
        spa_inputs,
        tmp_path,
        "spa.prompts_per_round=[4]",
        f"data.seed_pairs={spa_inputs / 'seed4.jsonl'}",
        "spa.refine=false",
    )


@pytest.mark.slow
def test_spa_round_with_refinement_and_eval_on_two_processes(spa_inputs, tmp_path):
    run_dir, reference = _spa_on_two_processes_matches_one(
        spa_inputs, tmp_path, "eval.enabled=true"
    )
    for name in ("round_1/eval.jsonl", "baseline_eval.jsonl"):
        assert (run_dir / name).read_text() == (reference / name).read_text(), name


def test_ple_iteration_on_two_processes_matches_one(spa_inputs, tmp_path):
    """SFT stage, sampling, scoring, routing and LoRA training across 2 processes give what
    one 8-device process gives: the same candidates and routes, adapters within 1e-5."""
    import jax

    from jaxalign.algorithms import ple
    from jaxalign.checkpoint import load_params

    launch("ple", tmp_path, str(spa_inputs))
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    ple.run(ple_config(spa_inputs, reference), log=lambda message: None)
    for name in ("candidates.jsonl", "ranking.jsonl", "sft.jsonl"):
        got, want = (d / "round_0" / name for d in (run_dir, reference))
        assert got.read_text() == want.read_text(), name
    scored = [json.loads(x) for x in (run_dir / "round_0/scored.jsonl").read_text().splitlines()]
    assert len(scored) == 4
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    assert set(state) == set(json.loads((reference / "state.json").read_text())["stages"])
    assert state["round_0/train"]["result"]["steps"] >= 1
    for lora in ("round_0/sft_lora", "round_0/lora"):
        want = load_params(reference / lora, None)
        got = load_params(run_dir / lora, None)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert "[round_0/train] finished" in (tmp_path / "worker_0.log").read_text()
    assert "[round_0/train]" not in (tmp_path / "worker_1.log").read_text()


def test_two_processes_join_from_the_three_jax_variables_alone(tmp_path):
    """Two machines as the guide sets them up: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, nothing else about the cluster, and jax.distributed not stubbed."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VAR_PREFIXES)}
    base.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(PROCESSES),
    )
    procs = []
    for pid in range(PROCESSES):
        env = {**base, "JAX_PROCESS_ID": str(pid)}
        cmd = [sys.executable, str(HERE), "join_from_environment", str(tmp_path)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * PROCESSES, "\n".join(outputs)
    for pid in range(PROCESSES):
        facts = json.loads((tmp_path / f"env_{pid}.json").read_text())
        assert facts == {
            "process_index": pid,
            "process_count": PROCESSES,
            "device_count": 2 * PROCESSES,
            "gathered": [{"id": str(q)} for q in range(PROCESSES)],
        }


if __name__ == "__main__":
    if sys.argv[1] == "join_from_environment":
        join_from_environment(pathlib.Path(sys.argv[2]))
    else:
        _task, _pid, _port, _out, *_rest = sys.argv[1:]
        _worker(_task, int(_pid), int(_port), pathlib.Path(_out), _rest)
