"""Test set-up: eight fake CPU devices, so sharding is tested on any machine."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs's default file system first asks the gRPC Storage Control API for a bucket's layout
# (zonal or hierarchical buckets); the local Cloud Storage emulator of the gs:// tests speaks
# only the JSON API, which is what gcsfs uses for a standard bucket, so the tests take gcsfs's
# JSON-API file system directly. Read when gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402

# Under CI (``CI`` set, as .ci/run does) nothing may be skipped: every skip in this suite
# means a missing install step (the embedded model, torch, transformers, an extra), and a
# broken step must fail the run, not turn the tests that need it off.
STRICT_SKIPS = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _fail_skip(report) -> None:
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI, which must run every test: {reason} "
            "(install as the README says; unset CI to allow skips)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())  # a module-level importorskip


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA:CPU executable
    keeps a few memory mappings for its code while a jit cache holds it; over the whole
    suite in one process they approached Linux's default ``vm.max_map_count`` (65,530:
    56,700 seen at the end of a passing run), and a run that crossed it crashed in
    whichever test compiled or allocated next (``LLVM compilation error: Cannot allocate
    memory``, then SIGSEGV or SIGABRT). Modules share no compiled programs worth keeping."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face folder with a 2-layer random model and SmolLM2's real tokenizer.

    Fast enough for end-to-end tests of the round loop; the numbers it produces are
    compared between runs, never against quality targets.
    """
    from jaxalign.loading import installed_gguf
    from jaxalign.tiny_model import TOKENIZER_MODEL, write_tiny_model

    if installed_gguf(TOKENIZER_MODEL) is None:
        spec = TOKENIZER_MODEL
        pytest.skip(f"{spec.package} is not installed ({spec.install_command})")
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


class EmulatedBucket:
    """What a Cloud Storage bucket served by gcp-storage-emulator holds, read over its JSON API
    with plain HTTP (not through gcsfs or etils, the code under test)."""

    def __init__(self, host: str, name: str):
        self.host, self.name = host, name

    def _get(self, path: str) -> bytes:
        import urllib.request

        with urllib.request.urlopen(f"{self.host}{path}", timeout=30) as response:
            return response.read()

    def names(self) -> list[str]:
        """Every object's name (``runs/spa/state.json``), sorted."""
        import json

        listing = json.loads(self._get(f"/storage/v1/b/{self.name}/o"))
        return sorted(item["name"] for item in listing.get("items", []))

    def read(self, name: str) -> bytes:
        from urllib.parse import quote

        return self._get(f"/download/storage/v1/b/{self.name}/o/{quote(name, safe='')}?alt=media")


@pytest.fixture
def gcs_bucket(monkeypatch):
    """``gs://bucket`` for one test, on an in-memory Cloud Storage server on 127.0.0.1
    (gcp-storage-emulator), reached as a run without TensorFlow reaches a real bucket:
    ``etils.epath`` -> fsspec -> gcsfs -> the Cloud Storage JSON API over HTTP. gcsfs sends
    its requests to ``STORAGE_EMULATOR_HOST`` with an anonymous token. Yields an
    :class:`EmulatedBucket` to check what landed in the bucket."""
    import socket

    import fsspec
    import gcsfs
    from etils.epath import backend, gpath
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    host = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # the fsspec path, always

    def fresh_clients():
        backend.fsspec_backend._get_filesystem.cache_clear()
        gcsfs.GCSFileSystem.clear_instance_cache()

    fresh_clients()
    try:
        yield EmulatedBucket(host, "bucket")
    finally:
        fresh_clients()
        server.stop()


@pytest.fixture(scope="session")
def torch_reward_dir(tmp_path_factory):
    """A random transformers ``LlamaForSequenceClassification`` (vocabulary 64, pad id 0)
    saved as a folder, and the torch model itself."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=0,
        rms_norm_eps=1e-6,
    )
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # a random, non-trivial head and norms
        model.score.weight.normal_(0, 0.5)
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("reward")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture
def skipping(monkeypatch):
    """Log-prob chunks with nothing scored are skipped in this process: the suite's 8 host
    devices turn the skip off (``jaxalign.training.SKIP_MAX_DEVICES``), and the tests that
    use this run their programs on one."""
    import jax

    from jaxalign import training

    monkeypatch.setattr(training, "SKIP_MAX_DEVICES", jax.device_count())
