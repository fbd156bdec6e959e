"""Run configuration: frozen dataclasses grouped by concern, loaded from YAML.

A config file holds groups (``run``, ``model``, ``data``, ``sampling``, ``train``,
``spa``, ``ple``, ``eval``); anything left out keeps its default, which is the
paper's setting. The command line overrides single fields with dotted
``key=value`` pairs (``train.learning_rate=1e-6 spa.rounds=2``); values are parsed
as YAML, so ``1e-6``, ``true`` and ``[0.5, 0.25]`` mean what they look like.

Errors name the file and the key, and suggest the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any

import yaml

from jaxalign.data.layouts import PAIR_LAYOUTS
from jaxalign.sampling import SamplingConfig
from jaxalign.training import TrainConfig
from jaxalign.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to start from and how to hold it."""

    name: str = "smollm2-135m-instruct"  # registry name, HF folder or .gguf path
    param_dtype: str = "float32"  # master weights
    dtype: str = "float32"  # compute; bfloat16 on TPU/GPU
    cache_dir: str | None = None  # converted-weights cache; None: $JAXALIGN_CACHE or ~/.cache


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the preference and prompt data come from and how it is cut to length."""

    seed_pairs: str = "demo"  # JSONL {prompt, chosen, rejected}; "demo": the packaged demo set
    prompts: str = "demo"  # JSONL {prompt} for the self-annotated rounds
    eval_prompts: str = "demo"  # JSONL {prompt, answer?} for the end-of-round evaluation
    max_prompt_tokens: int = 512  # prompts are left-truncated to this many tokens (counted)
    max_response_tokens: int = 300  # responses are right-truncated (counted); SPA samples 300
    use_chat_template: bool = True
    on_bad_record: str = "error"  # error | skip (skipped records are counted and reported)

    def __post_init__(self):
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(
                f"data.on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}"
            )


@dataclasses.dataclass(frozen=True)
class SPAConfig:
    """SPA (Kim et al., arXiv 2406.04412); defaults are the paper's."""

    rounds: int = 3  # paper: 3 self-annotated rounds after the seed DPO
    prompts_per_round: tuple[int, ...] = (8000, 20000, 30000)  # paper: 8K, 20K, 30K new prompts
    seed_epochs: int = 3  # paper: round 0 is 3 epochs of DPO on the seed pairs
    round_epochs: int = 1  # paper: 1 epoch per self-annotated round
    samples_per_prompt: int = 2  # paper: 2 responses per prompt
    refine: bool = True  # self-refinement with de-coupled noise detection
    extrapolation_lambdas: tuple[float, ...] = (0.5, 0.25, 0.125)  # paper: λ = 1/2, 1/4, 1/8
    noise_quantile: float = 0.1  # paper: pairs below the 10% quantile of margins are flagged
    margin_buffer_batches: int = 50  # paper: the threshold uses the last 50 batches' margins
    smoothing_alpha: float = 0.1  # paper: label smoothing α for flagged pairs
    flag_warmup_ratio: float = 0.2  # paper: no flagging in the first 20% of a round's steps
    # Beyond the paper (off by default): "smooth" (paper), "drop" (weight 0),
    # "soft" (label = judged p), "confidence" (loss weighted by |2p - 1|).
    label_mode: str = "smooth"
    # Degenerate candidates: identical pairs and empty responses are always
    # skipped (and counted); this says what to do with responses cut at
    # max_new_tokens without EOS: "keep" them (paper) or "skip" the pair.
    truncated_policy: str = "keep"
    # Beyond the paper (off): divide the judge's log-ratio by the response length, which
    # removes the summed reward's preference for longer self-samples.
    judge_length_normalize: bool = False

    def __post_init__(self):
        if self.label_mode not in ("smooth", "drop", "soft", "confidence"):
            raise ConfigError(
                "spa.label_mode must be one of smooth, drop, soft, confidence; "
                f"got {self.label_mode!r}"
            )
        if self.truncated_policy not in ("keep", "skip", "reject"):
            raise ConfigError(
                "spa.truncated_policy must be 'keep', 'skip' or 'reject', "
                f"got {self.truncated_policy!r}"
            )
        if not 0.0 < self.noise_quantile < 1.0:
            raise ConfigError(f"spa.noise_quantile must be in (0, 1), got {self.noise_quantile}")
        if self.samples_per_prompt < 2:
            raise ConfigError("spa.samples_per_prompt must be at least 2 to form a pair")

    def prompts_for_round(self, round_index: int) -> int:
        """New prompts for round ``round_index`` (1-based); the last entry repeats."""
        counts = self.prompts_per_round
        return counts[min(round_index, len(counts)) - 1]

    def lambda_for_round(self, round_index: int) -> float:
        """Extrapolation λ for round ``round_index`` (1-based); the last entry repeats."""
        lams = self.extrapolation_lambdas
        return lams[min(round_index, len(lams)) - 1]


DEFAULT_PRINCIPLES = (
    "Please give a response that is helpful, honest and harmless: answer the request "
    "correctly and concisely, say so when you do not know, and refuse to help with "
    "anything dangerous or unethical."
)


@dataclasses.dataclass(frozen=True)
class PLEConfig:
    """PLE (Liu, Xu, Geng, arXiv 2408.02599, ICML 2025); defaults are the paper's where stated.

    Choices the paper leaves open are named fields; :mod:`jaxalign.algorithms.ple`
    argues each default.
    """

    iterations: int = 3  # the paper's I is task-dependent; 3 rounds like SPA's
    prompts_per_iteration: int = 0  # 0: every query in every iteration (paper: D_query each time)
    tau0: float = 0.2  # paper §6.1: initial threshold τ0 = 0.2
    decay: float = 0.9  # paper §6.1: decay factor α = 0.9, τ_t = τ0·α^t
    principles: str = DEFAULT_PRINCIPLES  # paper: human-written principles p (HH: helpful/harmless)
    principle_placement: str = (
        "prefix"  # x ⊕ p: "prefix" (before the user turn) | "suffix" | "system"
    )
    reward: str = "demo-checker"  # a rule judge name or a local HF sequence-classification folder
    reward_normalisation: str = "minmax"  # minmax | sigmoid | none (rewards before the gap test)
    reward_range: tuple[float, ...] = ()  # minmax bounds [lo, hi]; empty: the iteration's range
    ranking_direction: str = "better"  # better: rank the higher reward first | principle: y_p only
    sft_weighting: str = (
        "reward"  # reward (normalised reward) | softmax (within the pair) | uniform
    )
    sft_coefficient: float = 1.0  # L = L_rank + c·L_sft (paper: plain sum)
    epochs: int = 1  # passes over each iteration's generated data
    # Algorithm 1 starts from a model fine-tuned on D_sft. Empty: start from the loaded
    # model as it is (e.g. an instruct model). A path (or "demo"): its records' `chosen`
    # responses (any pair layout, sft_layout) train the adapters for sft_epochs first.
    sft_data: str = ""
    sft_layout: str = "pairs"  # pairs | ultrafeedback | hh | tldr (the demonstration: chosen)
    sft_epochs: int = 1
    lora_rank: int = 8  # paper §6.1: LoRA r = 8
    lora_alpha: float = 16.0  # paper §6.1: LoRA scaling factor α = 16 (scale α/r = 2)
    lora_targets: tuple[str, ...] = (  # paper §6.1: all linear modules
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    reward_batch_size: int = 16  # responses scored together by a reward model
    export_hf: bool = True  # write the merged final model as a HF folder (run_dir/model_hf)

    def __post_init__(self):
        choices = {
            "principle_placement": ("prefix", "suffix", "system"),
            "reward_normalisation": ("minmax", "sigmoid", "none"),
            "ranking_direction": ("better", "principle"),
            "sft_weighting": ("reward", "softmax", "uniform"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"ple.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.tau0 < 0 or not 0 < self.decay <= 1:
            raise ConfigError(
                f"ple.tau0 must be >= 0 and ple.decay in (0, 1], got {self.tau0}, {self.decay}"
            )
        if self.reward_range and (
            len(self.reward_range) != 2 or self.reward_range[0] >= self.reward_range[1]
        ):
            raise ConfigError(
                f"ple.reward_range must be [lo, hi] with lo < hi, got {self.reward_range}"
            )
        if self.lora_rank < 1 or self.iterations < 1 or self.epochs < 1 or self.sft_epochs < 1:
            raise ConfigError(
                "ple.lora_rank, ple.iterations, ple.epochs and ple.sft_epochs must be positive"
            )
        if self.sft_layout not in PAIR_LAYOUTS:
            raise ConfigError(
                f"ple.sft_layout must be one of {', '.join(PAIR_LAYOUTS)}, got {self.sft_layout!r}"
            )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """End-of-round evaluation against the starting model."""

    enabled: bool = True
    # A registered rule judge (jaxalign.judging.RULE_JUDGES) or a local Hugging Face
    # sequence-classification folder (a reward model: higher reward wins).
    judge: str = "demo-checker"
    max_prompts: int = 64
    max_new_tokens: int = 128
    greedy: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    algorithm: str = "spa"  # spa | ple | dpo
    output_dir: str = "runs/spa"
    seed: int = 0
    progress: bool = True  # progress bars on stderr
    generate_batch_size: int = 16  # prompts decoded together (rows = this × samples per prompt)
    # Train-state checkpoints inside a train stage every N steps, so a killed stage resumes
    # mid-way; 0 saves none (a killed train stage restarts, finished stages never rerun).
    checkpoint_every: int = 0
    mesh: MeshConfig = MeshConfig()


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    model: ModelSpec = ModelSpec()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    spa: SPAConfig = SPAConfig()
    ple: PLEConfig = PLEConfig()
    eval: EvalConfig = EvalConfig()


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, f"{where}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(items))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Builds dataclass ``cls`` from a (nested) dict, checking names and types.

    ``where`` is the dotted path of ``data`` inside the config (for messages).
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{where}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from None


def to_dict(config: Any) -> dict:
    """A plain dict (tuples as lists) suitable for YAML/JSON."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        return x

    return plain(config)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a group")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["train.learning_rate=1e-6", ...]`` → nested dict, values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.learning_rate=1e-6)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | pathlib.Path | None = None, overrides=()) -> Config:
    """Reads a YAML config (or the defaults when ``path`` is None) and applies overrides."""
    data: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of groups")
        data = loaded or {}
    data = _merge(data, parse_overrides(list(overrides)))
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        source = f"{path} (with overrides)" if path is not None and overrides else path
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def save_config(config: Config, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
