"""Run configuration: frozen dataclasses grouped by concern, loaded from YAML.

A config file holds groups (``run``, ``model``, ``data``, ``sampling``, ``train``,
``spa``, ``ple``, ``eval``); anything left out keeps its default, which is the
paper's setting. The command line overrides single fields with dotted
``key=value`` pairs (``train.learning_rate=1e-6 spa.rounds=2``); values are parsed
as YAML, so ``1e-6``, ``true`` and ``[0.5, 0.25]`` mean what they look like.

Every field of every group is checked where its dataclass is made (ranges, choices,
non-empty lists, finite numbers; :mod:`jaxalign.validation`), and :class:`Config`
checks the rules between groups, so a bad value fails before anything runs. Errors
name the file and the dotted key, the value and what is allowed, and suggest the
closest known key for a misspelt one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import types
import typing
from typing import Any

import yaml

from jaxalign.data.layouts import PAIR_LAYOUTS
from jaxalign.judging import RULE_JUDGES
from jaxalign.models.llama import DTYPE_NAMES
from jaxalign.models.lora import ALL_LINEAR, LORA_TARGETS
from jaxalign.sampling import SamplingConfig
from jaxalign.training import TrainConfig
from jaxalign.validation import (
    BOOLEAN,
    NON_EMPTY_TEXT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    TEXT,
    ConfigError,
    Rule,
    check_fields,
    integer,
    is_finite_number,
    is_integer,
    list_of,
    number,
    one_of,
    optional,
    require,
    show,
)

DTYPE = one_of(*DTYPE_NAMES)  # what the model code computes in (jaxalign.models.llama)
# Paths and names are free text, but an empty one would silently mean "." (the current
# folder) or nothing at all.
PATH = NON_EMPTY_TEXT
JUDGE = Rule(
    NON_EMPTY_TEXT.accepts,
    f"a rule judge ({', '.join(RULE_JUDGES)}) or a reward-model folder, not empty",
)
# PLE's minmax bounds: empty (each iteration's own range) or [lo, hi], lo < hi, which
# (r - lo) / (hi - lo) divides by.
REWARD_RANGE = Rule(
    lambda v: (
        isinstance(v, tuple | list)
        and (not v or (len(v) == 2 and all(map(is_finite_number, v)) and v[0] < v[1]))
    ),
    "[] (each iteration's own range) or [lo, hi] with finite lo < hi",
    tuple,
)
MESH_AXIS_SIZE = Rule(lambda v: is_integer(v) and (v >= 1 or v == -1), "an integer >= 1, or -1")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to start from and how to hold it."""

    name: str = "smollm2-135m-instruct"  # registry name, HF folder or .gguf path
    param_dtype: str = "float32"  # master weights
    dtype: str = "float32"  # compute; bfloat16 on TPU/GPU
    cache_dir: str | None = None  # converted-weights cache; None: $JAXALIGN_CACHE or ~/.cache

    def __post_init__(self):
        check_fields(
            self,
            "model",
            {"name": PATH, "param_dtype": DTYPE, "dtype": DTYPE, "cache_dir": optional(PATH)},
        )


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
        check_fields(
            self,
            "data",
            {
                "seed_pairs": PATH,
                "prompts": PATH,
                "eval_prompts": PATH,
                # Token budgets: 0 would leave every prompt or response empty.
                "max_prompt_tokens": POSITIVE_INT,
                "max_response_tokens": POSITIVE_INT,
                "use_chat_template": BOOLEAN,
                "on_bad_record": one_of("error", "skip"),
            },
        )


# The `lora_*` options of SPA and of `jaxalign dpo` (PLE's rank must be positive).
LORA_CHECKS = {
    "lora_rank": NON_NEGATIVE_INT,  # 0: full fine-tuning
    "lora_alpha": POSITIVE,
    "lora_targets": list_of(one_of(*LORA_TARGETS), non_empty=True, unique=True),
}


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
    # The threshold is the quantile of the last `margin_window` pairs' margins: the SPA
    # authors' code keeps the last 50 (one pair per device step there).
    margin_window: int = 50
    smoothing_alpha: float = 0.1  # paper: label smoothing α for flagged pairs
    flag_warmup_ratio: float = 0.2  # paper: no flagging in the first 20% of a round's steps
    # Beyond the paper (off by default): "smooth" (paper), "drop" (weight 0),
    # "soft" (label = judged p), "confidence" (loss weighted by |2p - 1|).
    label_mode: str = "smooth"
    # Degenerate candidates: identical pairs and empty responses are always skipped (and
    # counted). A response cut at max_new_tokens without EOS is kept like any other (paper),
    # left out ("skip"), or always loses to a finished one ("reject"; jaxalign.judging).
    truncated_policy: str = "keep"
    # The judge's reward: "sum" of token log-ratios (paper) or their "mean" over the
    # response's tokens (beyond the paper: the sum favours longer on-policy samples).
    judge_reward: str = "sum"
    # Beyond the paper ("none"): "regress" takes the round's within-prompt linear trend of
    # reward on response length out of the rewards before pairs are formed
    # (jaxalign.judging.length_controlled_rewards), so length alone does not decide a label.
    length_control: str = "none"
    # The judge's model: π_{i-1} ("previous", paper) or π_0 after the seed DPO ("seed").
    judge_policy: str = "previous"
    # The model that samples a round's candidates: π_{i-1} ("previous", paper) or π_0 ("seed"),
    # whose samples its own implicit reward labels best (the judge is read off the seed
    # pairs' distribution; on later policies' samples its agreement with gold falls).
    sample_policy: str = "previous"
    # The DPO reference of round i's training: π_{i-1} ("previous", paper), which resets every
    # round's margins to 0, so a preference the rounds share is learned again each round and
    # the drift compounds; or π_0 ("seed", beyond the paper), one fixed anchor, against which
    # what earlier rounds learned already counts (its loss saturates) and only new
    # preferences pull. Round 1 is the same either way (π_0 = π_{i-1}).
    reference_policy: str = "previous"
    # When the judge is the model that sampled, take its log-probs of the sampled tokens from
    # the sampler (the unmodified distribution's, equal to a forward pass's within 1e-4 in
    # float32), so the judge runs only π_init's forward pass.
    judge_from_sampler: bool = True
    # Beyond the paper (1.0: keep all): keep only this share of a round's pairs, those
    # with the largest judged margins.
    keep_fraction: float = 1.0
    # Beyond the paper (0: every seed pair trains round 0, the paper's): hold out this share
    # of the seed pairs from round 0 and, once π_0 is trained, check its implicit reward
    # on them against the labels and against the length rules ("the shorter/longer one is
    # better"): a judge that does not beat them adds nothing but a length preference to the
    # rounds (round_0/judge_check in state.json; a warning in the log).
    seed_holdout: float = 0.0
    # Beyond the paper (0: full fine-tuning, the paper's): train LoRA adapters of rank
    # `lora_rank` instead (jaxalign.models.lora). The loaded model stays frozen and is
    # π_init, the judge's reference and round 0's; round i continues the adapters of
    # round i-1 against π_{i-1} = base ⊕ those adapters, so one copy of the weights is
    # held, without optimizer moments.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by α / r
    lora_targets: tuple[str, ...] = ALL_LINEAR

    @property
    def lora(self) -> bool:
        """Whether the rounds train LoRA adapters rather than every weight."""
        return self.lora_rank > 0

    def __post_init__(self):
        check_fields(
            self,
            "spa",
            {
                "rounds": NON_NEGATIVE_INT,  # 0: the seed DPO (round 0) alone
                # Round i takes entry i (the last repeats), so the list must have one, and a
                # round of 0 prompts would end the run. Entries past spa.rounds are unused,
                # which lets spa.rounds=1 override a config written for three rounds.
                "prompts_per_round": list_of(POSITIVE_INT, non_empty=True),
                "seed_epochs": POSITIVE_INT,
                "round_epochs": POSITIVE_INT,
                "samples_per_prompt": integer(2),  # the judge pairs two samples
                "refine": BOOLEAN,
                # h̃ = (1 + λ)·h_θ − λ·h_ref: λ = 0 is the policy itself, λ < 0 would pull
                # towards the reference instead of extrapolating away from it.
                "extrapolation_lambdas": list_of(NON_NEGATIVE, non_empty=True),
                # A quantile of the margin buffer: 0 and 1 are its min and max, which flag
                # (almost) nothing or everything.
                "noise_quantile": number(0, 1, low_open=True, high_open=True),
                "margin_window": POSITIVE_INT,
                # L = −(1 − α)·log σ(βΔ) − α·log σ(−βΔ): α = 1/2 makes the loss symmetric (no
                # preference left), α > 1/2 flips the label; 0 turns smoothing off.
                "smoothing_alpha": number(0, 0.5, high_open=True),
                "flag_warmup_ratio": number(0, 1),  # a share of the round's steps
                "label_mode": one_of("smooth", "drop", "soft", "confidence"),
                "truncated_policy": one_of("keep", "skip", "reject"),
                "judge_reward": one_of("sum", "mean"),
                "length_control": one_of("none", "regress"),
                "judge_policy": one_of("previous", "seed"),
                "sample_policy": one_of("previous", "seed"),
                "reference_policy": one_of("previous", "seed"),
                "judge_from_sampler": BOOLEAN,
                # A share of the round's pairs; 0 would leave nothing to train on.
                "keep_fraction": number(0, 1, low_open=True),
                # At most half the seed: round 0 must keep pairs to train on.
                "seed_holdout": number(0, 0.5),
                **LORA_CHECKS,
            },
        )

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

    Choices the paper leaves open are named fields; :mod:`jaxalign.enhancement`
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

    def __post_init__(self):
        check_fields(
            self,
            "ple",
            {
                "iterations": POSITIVE_INT,
                "prompts_per_iteration": NON_NEGATIVE_INT,  # 0: every query
                # τ_t = τ0·α^t is a bound on a reward gap |r(y_p) − r(y)|, never negative;
                # α in (0, 1] keeps it shrinking (or constant), as the paper's decay does.
                "tau0": NON_NEGATIVE,
                "decay": number(0, 1, low_open=True),
                "principles": NON_EMPTY_TEXT,  # x ⊕ p with an empty p is x: no y_p to learn
                "principle_placement": one_of("prefix", "suffix", "system"),
                "reward": JUDGE,
                "reward_normalisation": one_of("minmax", "sigmoid", "none"),
                "reward_range": REWARD_RANGE,
                "ranking_direction": one_of("better", "principle"),
                "sft_weighting": one_of("reward", "softmax", "uniform"),
                "sft_coefficient": NON_NEGATIVE,  # L_rank + c·L_sft; c < 0 would unlearn y_p
                "epochs": POSITIVE_INT,
                "sft_data": TEXT,  # a path, "demo", or empty: no SFT stage
                "sft_layout": one_of(*PAIR_LAYOUTS),
                "sft_epochs": POSITIVE_INT,
                "lora_rank": POSITIVE_INT,
                "lora_alpha": POSITIVE,  # the update is scaled by α / r: 0 would turn LoRA off
                "lora_targets": list_of(one_of(*LORA_TARGETS), non_empty=True, unique=True),
                "reward_batch_size": POSITIVE_INT,
            },
        )
        # Only minmax normalisation reads the bounds; given with another, they would be
        # ignored without a word.
        require(
            not self.reward_range or self.reward_normalisation == "minmax",
            f"ple.reward_range is used only with ple.reward_normalisation=minmax; got "
            f"{show(self.reward_range)} with {self.reward_normalisation}: set "
            "ple.reward_range=[] or ple.reward_normalisation=minmax",
        )


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """``jaxalign dpo``, the standalone DPO command (SPA's round 0 follows ``spa.lora_*``)."""

    # 0: every weight trains. r > 0: LoRA adapters of rank r train on the frozen loaded
    # model, which is also the reference; `<output_dir>/lora` holds them and the exported
    # model has them merged in.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by α / r
    lora_targets: tuple[str, ...] = ALL_LINEAR

    def __post_init__(self):
        check_fields(self, "dpo", LORA_CHECKS)


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

    def __post_init__(self):
        check_fields(
            self,
            "eval",
            {
                "enabled": BOOLEAN,
                "judge": JUDGE,
                "max_prompts": POSITIVE_INT,  # the first N eval prompts; 0 would evaluate none
                "max_new_tokens": POSITIVE_INT,
                "greedy": BOOLEAN,
            },
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        size = MESH_AXIS_SIZE
        check_fields(self, "run.mesh", {"data": size, "fsdp": size, "tensor": size})
        sizes = dataclasses.astuple(self)
        require(
            sizes.count(-1) <= 1,
            "at most one of run.mesh.data, run.mesh.fsdp and run.mesh.tensor may be -1 (the "
            f"devices the others leave), got data={self.data} fsdp={self.fsdp} "
            f"tensor={self.tensor}",
        )


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
    # Which rounds' models are written as Hugging Face folders with a model card
    # (round_K/model_hf) when the run finishes: "last" (the final round), "all" or "none".
    # `jaxalign export` writes any finished round later.
    export_hf: str = "last"
    # JAX's persistent compilation cache (xla/ under the jaxalign cache): a rerun or a
    # resumed run loads its compiled programs instead of compiling them again.
    compile_cache: bool = True
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_fields(
            self,
            "run",
            {
                "algorithm": one_of("spa", "ple", "dpo"),
                "output_dir": PATH,
                "seed": SEED,
                "progress": BOOLEAN,
                "generate_batch_size": POSITIVE_INT,
                "checkpoint_every": NON_NEGATIVE_INT,  # 0: no mid-stage checkpoints
                "export_hf": one_of("last", "all", "none"),
                "compile_cache": BOOLEAN,
                "mesh": Rule(lambda v: isinstance(v, MeshConfig), "a mapping of mesh sizes"),
            },
        )


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    model: ModelSpec = ModelSpec()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    spa: SPAConfig = SPAConfig()
    ple: PLEConfig = PLEConfig()
    dpo: DPOConfig = DPOConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        train, mesh = self.train, self.run.mesh
        # A global batch is split evenly over the data x fsdp shards
        # (parallel.batch_divisor), and so is each micro-batch. An axis of -1 is known only
        # once the devices are; the fixed ones already divide the batch.
        fixed = {k: v for k, v in (("data", mesh.data), ("fsdp", mesh.fsdp)) if v != -1}
        shards = math.prod(fixed.values())
        axes = " x ".join(f"run.mesh.{k} ({v})" for k, v in fixed.items())
        require(
            train.batch_size % (train.micro_batches * shards) == 0,
            f"train.batch_size must be a multiple of train.micro_batches ({train.micro_batches})"
            f" x {axes} = {train.micro_batches * shards}, got {train.batch_size}",
        )
        require(
            self.run.generate_batch_size % shards == 0,
            f"run.generate_batch_size must be a multiple of {axes} = {shards} (each decode "
            f"batch is split over those shards), got {self.run.generate_batch_size}",
        )
        # SPA pairs two samples of each prompt; greedy decoding makes them identical, and
        # identical pairs are skipped, so no round would have data to train on.
        require(
            not (self.run.algorithm == "spa" and self.sampling.greedy),
            "sampling.greedy must be false with run.algorithm=spa (its pairs are two samples "
            "of the same prompt, which greedy decoding makes identical), got true",
        )
        # sampling.max_new_tokens may exceed data.max_response_tokens: a longer sample is cut
        # to the same length for judging and for training, and counted as truncated.


def _strip_optional(tp):
    """``(type without None, whether None is allowed)``; a union of several types is kept
    whole (its field's rule decides, e.g. ``train.remat: bool | str | None``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), len(rest) < len(args)
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as read from YAML, converted to field type ``tp`` or refused; ranges and
    choices are the dataclasses' own checks."""
    tp, nullable = _strip_optional(tp)
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where}: null is not allowed here, got null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {show(value)}")
        return from_dict(tp, value, f"{where}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(items))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {show(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        # YAML reads 2024 as a number and true as a boolean: text must say it is text.
        raise ConfigError(
            f"{where}: expected a string, got {show(value)} (quote numbers and booleans "
            "meant as text)"
        )
    return value


# Keys that moved, and what to write instead.
MOVED_KEYS = {
    "ple.export_hf": (
        "run.export_hf (last | all | none), which chooses the exported rounds for SPA and PLE "
        "alike; ple.export_hf=true is run.export_hf=last (the default), false is "
        "run.export_hf=none"
    ),
}


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Builds dataclass ``cls`` from a (nested) dict, checking names and types.

    ``where`` is the dotted path of ``data`` inside the config (for messages).
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if f"{where}{key}" in MOVED_KEYS:
            raise ConfigError(f"'{where}{key}' is now {MOVED_KEYS[f'{where}{key}']}")
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
