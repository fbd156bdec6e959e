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


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.initialize_distributed(num_processes=1) is False


def test_initialize_distributed_starts_runtime_for_many_processes(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert parallel.initialize_distributed("10.0.0.1:1234", 4, 2) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2,t3,t4")
    assert parallel.initialize_distributed() is True


def test_one_process_feeds_every_row_and_global_rows_is_checked():
    mesh = parallel.make_mesh(2, 2, 2)
    assert parallel.process_row_blocks(mesh, 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    np.testing.assert_array_equal(parallel.process_rows(mesh, 8), np.arange(8))
    full = {"ids": np.arange(16).reshape(8, 2), "w": np.linspace(0, 1, 8)}
    batch = parallel.shard_host_batch(full, mesh)
    np.testing.assert_array_equal(np.asarray(batch["ids"]), full["ids"])
    with pytest.raises(ValueError, match="global batch of 16"):
        parallel.make_global_batch({"ids": np.zeros((8, 2))}, mesh, global_rows=16)
    with pytest.raises(ValueError, match="different row counts"):
        parallel.shard_host_batch({"a": np.zeros(8), "b": np.zeros(4)}, mesh)


def test_to_host_copies_local_arrays():
    mesh = parallel.make_mesh(2, 2, 2)
    x = parallel.make_global_batch({"x": np.arange(8.0)}, mesh)["x"]
    out = parallel.tree_to_host({"x": x})
    assert isinstance(out["x"], np.ndarray)
    np.testing.assert_array_equal(out["x"], np.arange(8.0))


def _clear_process_vars(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "TPU_SKIP_MDS_QUERY",
    ):
        monkeypatch.delenv(var, raising=False)


def test_tpu_vm_worker_count_asks_the_metadata_server_only_on_a_tpu_vm(monkeypatch):
    _clear_process_vars(monkeypatch)
    asked = []

    def metadata(name):
        asked.append(name)
        return {"worker-network-endpoints": "t1:0:10.0.0.2,t2:1:10.0.0.3"}.get(name)

    assert parallel.tpu_vm_worker_count(lambda: 0, metadata) == 1
    assert asked == []  # no chips: never queried
    assert parallel.tpu_vm_worker_count(lambda: 4, metadata) == 2
    assert asked == ["worker-network-endpoints"]
    assert parallel.tpu_vm_worker_count(lambda: 4, lambda name: "10.0.0.2") == 1
    assert parallel.tpu_vm_worker_count(lambda: 4, lambda name: None) == 1  # unreadable
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    assert parallel.tpu_vm_worker_count(lambda: 4, metadata) == 1


def test_initialize_distributed_detects_a_multi_host_tpu_vm_without_env_vars(monkeypatch):
    _clear_process_vars(monkeypatch)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert parallel.initialize_distributed(tpu_worker_count=lambda: 1) is False
    assert parallel.initialize_distributed(tpu_worker_count=lambda: 4) is True
    assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]
    # Explicit variables win: no metadata look-up when they say "one process".
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    looked = []
    assert parallel.initialize_distributed(tpu_worker_count=lambda: looked.append(1) or 4) is False
    assert looked == []


def test_gce_metadata_attribute_sends_the_header_and_gives_up_in_time(monkeypatch):
    import http.server
    import socket
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Metadata-Flavor") == "Google" and self.path.endswith(
                "/instance/attributes/worker-network-endpoints"
            )
            body = b"w0,w1,w2,w3" if ok else b"denied"
            self.send_response(200 if ok else 403)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
        assert parallel.gce_metadata_attribute("worker-network-endpoints") == "w0,w1,w2,w3"
        assert parallel.gce_metadata_attribute("accelerator-type") is None  # 403
    finally:
        server.shutdown()
        server.server_close()
    # A server that accepts but never answers: the query gives up after its timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{silent.getsockname()[1]}")
        assert parallel.gce_metadata_attribute("worker-network-endpoints", timeout=0.3) is None
    finally:
        silent.close()
