"""Mesh construction, logical-axis rules, global batches and multi-process detection."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import parallel
from jaxalign.models.llama import ModelConfig, Transformer


def test_make_mesh_fills_the_rest():
    mesh = parallel.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    one = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize(
    "sizes, message",
    [((3, 1, 1), "8 are available"), ((-1, 3, 1), "not divisible"), ((-1, -1, 2), "at most one")],
)
def test_make_mesh_rejects_bad_shapes(sizes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(*sizes)


def _specs(config, mesh):
    model = Transformer(config, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    return parallel.model_shardings(state, mesh), parallel.shard_model_state(state, mesh)


def test_rules_shard_every_kind_of_parameter():
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    mesh = parallel.make_mesh(2, 2, 2)
    shardings, placed = _specs(config, mesh)
    attn = shardings["layers"]["self_attn"]
    assert shardings["embed_tokens"].spec == P("tensor", "fsdp")
    assert shardings["lm_head"].spec == P("fsdp", "tensor")
    assert attn["q_proj"].spec == P(None, "fsdp", "tensor", None)
    assert attn["o_proj"].spec == P(None, "tensor", None, "fsdp")
    assert shardings["layers"]["mlp"]["down_proj"].spec == P(None, "tensor", "fsdp")
    assert shardings["norm"]["weight"].spec == P(None)
    # Each device holds a quarter of the embedding (vocab/2 x embed/2).
    shard = placed["embed_tokens"].addressable_shards[0].data
    assert shard.shape == (32, 16)


def test_indivisible_dimensions_fall_back_to_replication():
    # SmolLM2's 9 query heads and 3 KV heads cannot be split over tensor=2.
    config = ModelConfig(
        vocab_size=64,
        hidden_size=36,
        intermediate_size=48,
        num_layers=1,
        num_heads=9,
        num_kv_heads=3,
    )
    mesh = parallel.make_mesh(2, 2, 2)
    shardings, placed = _specs(config, mesh)
    attn = shardings["layers"]["self_attn"]
    assert attn["q_proj"].spec == P(None, "fsdp", None, None)
    assert attn["k_proj"].spec == P(None, "fsdp", None, None)
    assert shardings["layers"]["mlp"]["up_proj"].spec == P(None, "fsdp", "tensor")
    np.testing.assert_array_equal(
        placed["layers"]["self_attn"]["q_proj"][...],
        nnx.state(Transformer(config, rngs=nnx.Rngs(0)))["layers"]["self_attn"]["q_proj"][...],
    )


def test_logical_to_mesh_sharding_with_custom_rules():
    mesh = parallel.make_mesh(2, 2, 2)
    tree = {"a": P("embed", "mlp"), "b": P("vocab", None)}
    rules = {"embed": ("data", "fsdp"), "mlp": "tensor", "vocab": "fsdp"}
    out = parallel.logical_to_mesh_sharding(tree, mesh, rules)
    assert out["a"].spec == P(("data", "fsdp"), "tensor")
    assert out["b"].spec == P("fsdp", None)
    # The same mesh axis is never used twice in one array.
    twice = parallel.logical_to_mesh_sharding({"c": P("embed", "embed")}, mesh)
    assert twice["c"].spec == P("fsdp", None)


def test_make_global_batch_splits_rows_over_data_and_fsdp():
    mesh = parallel.make_mesh(2, 2, 2)
    local = {"ids": np.arange(8 * 3).reshape(8, 3).astype(np.int32), "w": np.ones(8, np.float32)}
    batch = parallel.make_global_batch(local, mesh)
    assert batch["ids"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(batch["ids"], local["ids"])
    rows = {s.data.shape[0] for s in batch["ids"].addressable_shards}
    assert rows == {2}
    with pytest.raises(ValueError, match="weight-0 pairs"):
        parallel.make_global_batch({"ids": np.zeros((6, 3))}, mesh)


def test_one_process_feeds_every_row_and_global_rows_is_checked():
    mesh = parallel.make_mesh(2, 2, 2)
    assert parallel.process_row_blocks(mesh, 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    np.testing.assert_array_equal(parallel.process_rows(mesh, 8), np.arange(8))
    full = {"ids": np.arange(16).reshape(8, 2), "w": np.linspace(0, 1, 8)}
    batch = parallel.shard_host_batch(full, mesh)
    np.testing.assert_array_equal(np.asarray(batch["ids"]), full["ids"])
    with pytest.raises(ValueError, match="global batch of 16"):
        parallel.make_global_batch({"ids": np.zeros((8, 2))}, mesh, global_rows=16)
    mixed = parallel.shard_host_batch({"a": np.arange(8.0), "b": np.arange(4.0)}, mesh)
    np.testing.assert_array_equal(np.asarray(mixed["b"]), np.arange(4.0))  # each by its rows
    assert mixed["b"].sharding == parallel.batch_sharding(mesh)
    with pytest.raises(ValueError, match="batch of 6 rows does not split"):
        parallel.shard_host_batch({"a": np.zeros(8), "b": np.zeros(6)}, mesh)


def test_to_host_copies_local_arrays():
    mesh = parallel.make_mesh(2, 2, 2)
    x = parallel.make_global_batch({"x": np.arange(8.0)}, mesh)["x"]
    out = parallel.tree_to_host({"x": x})
    assert isinstance(out["x"], np.ndarray)
    np.testing.assert_array_equal(out["x"], np.arange(8.0))


PROCESS_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_NUM_SLICES",
    "TPU_SKIP_MDS_QUERY",
)


def _no_tpu():
    raise AssertionError("the TPU metadata must not be queried here")


def settings(env, **kwargs):
    kwargs.setdefault("tpu_processes", _no_tpu)
    return parallel.distributed_settings(environ=env, **kwargs)


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in PROCESS_VARS:
        monkeypatch.delenv(var, raising=False)
    # This machine has no TPU chips: no metadata query, one process.
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(num_processes=1) is False


def test_the_three_jax_variables_are_all_passed_on():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "2"}
    assert settings({**env, "JAX_PROCESS_ID": "1"}) == {
        "coordinator_address": "10.0.0.2:8476",
        "num_processes": 2,
        "process_id": 1,
    }
    # Arguments win over the variables.
    assert settings({**env, "JAX_PROCESS_ID": "1"}, process_id=0)["process_id"] == 0
    assert settings({"JAX_NUM_PROCESSES": "1"}) is None
    assert settings({}, tpu_processes=lambda: 1) is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID are not"),
        (
            {"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"},
            "but JAX_PROCESS_ID is not",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES is not"),
        ({"JAX_PROCESS_ID": "0"}, "JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not"),
        (
            {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"},
            "outside 0..1",
        ),
        ({"JAX_NUM_PROCESSES": "two"}, "'two' is not a whole number"),
        ({"JAX_NUM_PROCESSES": "0"}, "is 0"),
    ],
)
def test_incomplete_jax_variables_say_what_to_set(env, message):
    with pytest.raises(ValueError, match=message) as e:
        settings(env)
    if "whole number" not in message and "outside" not in message:
        assert "JAX_PROCESS_ID (0, 1, ..., a different one on each)" in str(e.value)


def test_schedulers_and_gke_tpu_slices_leave_the_details_to_jax():
    unset = {"coordinator_address": None, "num_processes": None, "process_id": None}
    assert settings({"SLURM_NTASKS": "4"}) == unset
    assert settings({"OMPI_COMM_WORLD_SIZE": "2"}) == unset
    assert settings({"SLURM_NTASKS": "1"}) is None
    # Under SLURM JAX finds the process id itself.
    assert settings({"SLURM_NTASKS": "4", "JAX_NUM_PROCESSES": "4"})["num_processes"] == 4
    # GKE: TPU_PROCESS_ADDRESSES is read before TPU_WORKER_HOSTNAMES, as JAX reads them.
    assert settings({"TPU_PROCESS_ADDRESSES": "a,b", "TPU_WORKER_HOSTNAMES": "a"}) == unset
    assert settings({"TPU_PROCESS_ADDRESSES": "a", "TPU_WORKER_HOSTNAMES": "a,b"}) is None
    assert settings({"TPU_WORKER_HOSTNAMES": "a"}) is None
    # One host per slice, two slices: two processes.
    assert settings({"TPU_WORKER_HOSTNAMES": "a", "MEGASCALE_NUM_SLICES": "2"}) == unset


def test_a_cloud_tpu_vm_is_asked_only_without_variables():
    unset = {"coordinator_address": None, "num_processes": None, "process_id": None}
    assert settings({}, tpu_processes=lambda: 4) == unset
    assert settings({}, tpu_processes=lambda: 1) is None
    assert settings({"JAX_NUM_PROCESSES": "1"}) is None  # _no_tpu: never asked


def test_an_unreadable_tpu_metadata_server_is_an_error_with_the_fix():
    def unreachable():
        raise parallel.MetadataUnavailable("the GCE metadata server at 169.254.169.254 gave none")

    with pytest.raises(RuntimeError) as e:
        settings({}, tpu_processes=unreachable, tpu_chips=lambda: 4)
    message = str(e.value)
    assert message.startswith("this machine has 4 TPU chip(s), but the GCE metadata server")
    for fix in ("TPU_SKIP_MDS_QUERY=1", "JAX_COORDINATOR_ADDRESS=HOST:PORT", "curl -s -H"):
        assert fix in message


def test_tpu_vm_process_count_asks_the_metadata_server_only_on_a_tpu_vm():
    asked = []
    attributes = {"worker-network-endpoints": "t1:0:10.0.0.2,t2:1:10.0.0.3"}

    def metadata(name):
        asked.append(name)
        return attributes.get(name)

    def count(chips, env=None, server=metadata):
        return parallel.tpu_vm_process_count(lambda: chips, server, {} if env is None else env)

    assert count(0) == 1 and asked == []  # no chips: never queried
    assert count(4, {"TPU_SKIP_MDS_QUERY": "1"}) == 1 and asked == []
    assert count(4) == 2
    assert asked == ["worker-network-endpoints", "tpu-env"]  # tpu-env: the slice count
    attributes["tpu-env"] = "ACCELERATOR_TYPE: 'v5litepod-16'\nMEGASCALE_NUM_SLICES: '2'\n"
    assert count(4) == 4
    asked.clear()
    assert count(4, {"MEGASCALE_NUM_SLICES": "3"}) == 6
    assert asked == ["worker-network-endpoints"]
    assert count(4, server=lambda name: "10.0.0.2" if name != "tpu-env" else None) == 1
    assert count(4, server=lambda name: None) == 1  # answered: not part of a TPU slice

    def unreachable(name):
        raise parallel.MetadataUnavailable("no answer")

    with pytest.raises(parallel.MetadataUnavailable):
        count(4, server=unreachable)
    with pytest.raises(ValueError, match="MEGASCALE_NUM_SLICES='x'"):
        count(4, {"MEGASCALE_NUM_SLICES": "x"})


def test_local_tpu_chips_without_pci_counts_accel_and_vfio_devices(monkeypatch):
    from jax._src import hardware_utils

    def unreadable():
        raise OSError("no /sys/bus/pci")

    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", unreadable)
    devices = {"/dev/accel[0-9]*": [], "/dev/vfio/[0-9]*": ["/dev/vfio/0", "/dev/vfio/1"]}
    monkeypatch.setattr(parallel.glob, "glob", lambda pattern: devices[pattern])
    assert parallel.local_tpu_chips() == 2  # v5e / v5p / v6e
    devices.update({"/dev/accel[0-9]*": ["/dev/accel0"] * 4, "/dev/vfio/[0-9]*": []})
    assert parallel.local_tpu_chips() == 4  # v4


def test_gce_metadata_attribute_sends_the_header_and_gives_up_in_time(monkeypatch):
    import http.server
    import socket
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Metadata-Flavor") != "Google":
                code, body = 403, b"denied"
            elif self.path.endswith("/instance/attributes/worker-network-endpoints"):
                code, body = 200, b"w0,w1,w2,w3"
            else:
                code, body = 404, b"not found"
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
        assert parallel.gce_metadata_attribute("worker-network-endpoints") == "w0,w1,w2,w3"
        assert parallel.gce_metadata_attribute("tpu-env") is None  # 404: no such attribute
    finally:
        server.shutdown()
        server.server_close()
    # A server that accepts but never answers: an error after tries x timeout, not a guess.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(parallel.MetadataUnavailable, match="2 tries of 0.3 s"):
            parallel.gce_metadata_attribute("worker-network-endpoints", timeout=0.3, tries=2)
        assert time.monotonic() - start < 5
    finally:
        silent.close()


# ----------------------------------------------------------------------------- what a run says


def test_the_device_line_names_devices_processes_and_mesh():
    mesh = parallel.make_mesh(2, 2, 2)
    assert parallel.describe_devices(mesh) == (
        "devices: 8 x cpu (1 process); mesh data=2 fsdp=2 tensor=2"
    )
    assert parallel.describe_devices() == "devices: 8 x cpu (1 process)"


def _probe_log():
    import logging

    return logging.getLogger("jax._src.xla_bridge")


def test_backend_probes_are_held_back_and_real_warnings_kept(monkeypatch):
    import logging

    monkeypatch.setattr(parallel, "_MISSED_ACCELERATORS", [])
    parallel.quiet_backend_probes()
    parallel.quiet_backend_probes()  # idempotent: one filter
    logger = _probe_log()
    assert sum(isinstance(f, parallel._BackendProbeFilter) for f in logger.filters) == 1
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
        logger.warning(
            "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not "
            "installed. Falling back to cpu."
        )
        logger.warning("CUDA backend failed to initialize: out of memory.")
        logger.error("Unable to initialize backend 'cuda': something the user asked for")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == [
        "CUDA backend failed to initialize: out of memory.",
        "Unable to initialize backend 'cuda': something the user asked for",
    ]
    line = parallel.describe_devices()
    assert line.startswith("devices: 8 x cpu (1 process); an NVIDIA GPU is visible but this jax")
    assert "pip install 'jaxalign[cuda12]'" in line


def test_the_command_line_prints_no_backend_probe(tmp_path, tiny_model_dir):
    """``jaxalign generate`` in a fresh process, with JAX left to probe every backend it
    knows (no JAX_PLATFORMS): its output holds no probe message."""
    import os
    import pathlib
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Name a colour."}\n')
    command = [sys.executable, "-m", "jaxalign", "generate", "--model", str(tiny_model_dir)]
    command += ["--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    command += ["--n", "1", "--max-new-tokens", "2", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote 1 prompts" in done.stdout
    for noise in ("Unable to initialize backend", "may be present on this machine"):
        assert noise not in done.stdout + done.stderr


def test_the_compile_cache_stores_programs_and_can_be_turned_off(tmp_path, monkeypatch):
    """A compiled program lands in the cache directory; with
    JAXALIGN_COMPILE_CACHE=0 nothing is configured. Run in a fresh interpreter, since the
    cache is process-wide."""
    import os
    import subprocess
    import sys

    program = (
        "import jax, jax.numpy as jnp\n"
        "from jaxalign import parallel\n"
        "from jaxalign.loading import compile_cache_dir\n"
        "print(parallel.use_compile_cache(compile_cache_dir(), min_compile_seconds=0))\n"
        "def f(x):\n"
        "    return jnp.tanh(x @ x.T + 1.0)\n"
        "jax.jit(f)(jnp.ones((32, 32))).block_until_ready()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAXALIGN_COMPILE_CACHE"}
    env["JAXALIGN_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == str(tmp_path / "cache" / "xla")
    assert any(p.name.startswith("jit_f") for p in (tmp_path / "cache" / "xla").iterdir())
    env["JAXALIGN_COMPILE_CACHE"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "None"
