"""Config loading: YAML groups, dotted overrides, errors that name file and key."""

import dataclasses
import json
import pathlib
import re
import typing

import pytest
import yaml

from jaxalign.config import (
    Config,
    ConfigError,
    MeshConfig,
    PLEConfig,
    RunConfig,
    SPAConfig,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from jaxalign.sampling import SamplingConfig
from jaxalign.training import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    c = load_config()
    assert c.train.learning_rate == 5e-7 and c.train.batch_size == 32 and c.train.beta == 0.1
    assert c.sampling.temperature == 0.7 and c.sampling.top_p == 1.0
    assert c.sampling.max_new_tokens == 300
    assert c.spa.extrapolation_lambdas == (0.5, 0.25, 0.125)
    assert c.spa.noise_quantile == 0.1 and c.spa.smoothing_alpha == 0.1
    assert c.spa.flag_warmup_ratio == 0.2 and c.spa.seed_epochs == 3
    assert c.spa.prompts_per_round == (8000, 20000, 30000)
    assert c.spa.lambda_for_round(3) == 0.125 and c.spa.lambda_for_round(5) == 0.125


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    c = load_config(path)
    assert c.run.algorithm == ("ple" if path.name.startswith("ple") else "spa")


def test_overrides_parse_yaml_values():
    c = load_config(
        ROOT / "configs" / "demo_smollm2.yaml",
        [
            "train.learning_rate=2e-6",
            "spa.rounds=1",
            "spa.extrapolation_lambdas=[0.3]",
            "run.mesh.data=2",
            "eval.enabled=false",
        ],
    )
    assert c.train.learning_rate == 2e-6 and c.spa.rounds == 1
    assert c.spa.extrapolation_lambdas == (0.3,) and c.run.mesh.data == 2
    assert c.eval.enabled is False
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rat: 1e-6\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "learning_rate" in str(e.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.batch_size=abc", "train.batch_size: expected an integer"),
        ("spa.refine=maybe", "expected true or false"),
        ("spa.label_mode=wild", "spa.label_mode"),
        ("data.on_bad_record=ignore", "on_bad_record"),
        ("train.loss=nope", "train.loss"),
        ("sampling.top_p=0", "top_p"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_are_reported(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_save_and_reload_round_trip(tmp_path):
    c = load_config(ROOT / "configs" / "demo_smollm2.yaml")
    save_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c
    assert isinstance(c, Config)


# ----------------------------------------------------------------------------- every field
#
# Each leaf field of Config (nested groups included: run.mesh, sampling, train) gets the
# wrong-type values for its type (WRONG_TYPE) and the out-of-range values for its meaning
# (OUT_OF_RANGE). A field missing from OUT_OF_RANGE and TYPE_ONLY fails
# test_every_field_has_bad_values, so a field added later must say what it refuses, and
# one whose bad values are accepted fails test_every_bad_value_is_refused_naming_its_key.
# Values are override text, parsed as YAML as on the command line.

WRONG_TYPE = {
    int: ["abc", "1.5", "true", "[1]", "{a: 1}", "null", ".nan", ".inf"],
    float: ["abc", "true", "[0.5]", "{a: 1}", "null", ".nan", ".inf", "-.inf", "nan"],
    bool: ["maybe", "1", "[true]", "{a: 1}", "null"],
    str: ["[a]", "{a: 1}", "true", "12", "null"],
    str | None: ["[a]", "{a: 1}", "true", "12"],
    tuple[int, ...]: ["abc", "[abc]", "[1.5]", "[true]", "{a: 1}", "null"],
    tuple[float, ...]: ["abc", "[abc]", "[.nan]", "[.inf]", "[true]", "{a: 1}", "null"],
    tuple[str, ...]: ["[[a]]", "{a: 1}", "[1]", "null"],
    bool | str | None: ["1", "0.5", "[a]", "{a: 1}"],
    bool | None: ["maybe", "1", "[true]", "{a: 1}", "auto"],
}

OUT_OF_RANGE = {
    "run.algorithm": ["sft", "SPA", ""],
    "run.output_dir": ["''", "'  '"],
    "run.seed": ["-1", "4294967296"],
    "run.generate_batch_size": ["0", "-1", "6"],  # 6: not a multiple of run.mesh.data=4 below
    "run.checkpoint_every": ["-1"],
    "run.export_hf": ["first", "''", "true"],
    "run.mesh.data": ["0", "-2", "3"],  # 3 does not divide train.batch_size 32
    "run.mesh.fsdp": ["0", "-2", "-1"],  # -1 next to run.mesh.data=-1: two axes to fill
    "run.mesh.tensor": ["0", "-2", "-1"],
    "model.name": ["''"],
    "model.param_dtype": ["float8", "fp16", "int8", "''"],
    "model.dtype": ["float8", "half", "float64"],
    "model.cache_dir": ["''"],
    "data.seed_pairs": ["''"],
    "data.prompts": ["''"],
    "data.eval_prompts": ["''"],
    "data.max_prompt_tokens": ["0", "-1"],
    "data.max_response_tokens": ["0", "-1"],
    "data.on_bad_record": ["ignore", "''"],
    "sampling.max_new_tokens": ["0", "-1"],
    "sampling.temperature": ["0", "-1"],
    "sampling.top_k": ["-1"],
    "sampling.top_p": ["0", "-0.1", "1.5"],
    "sampling.min_p": ["-0.1", "1.5"],
    "sampling.n": ["0", "-1"],
    "sampling.eos_token_ids": ["[-1]", "[2, -3]"],
    "sampling.pad_token_id": ["-1"],
    "sampling.cache_dtype": ["float8", "''"],
    "train.learning_rate": ["0", "-1", "-1e-6"],
    "train.warmup_ratio": ["-0.1", "1.5"],
    "train.schedule": ["exponential", "''"],
    "train.weight_decay": ["-0.1"],
    "train.adam_b1": ["-0.1", "1", "1.5"],
    "train.adam_b2": ["-0.1", "1", "1.5"],
    "train.adam_eps": ["0", "-1e-8"],
    "train.max_grad_norm": ["0", "-1"],
    "train.batch_size": ["0", "-1", "30"],  # 30: not a multiple of run.mesh.data=4
    "train.micro_batches": ["0", "-1", "3"],  # 3 does not divide batch_size 32
    "train.beta": ["0", "-0.1"],
    "train.loss": ["dpo++", "''"],
    "train.ranking_margin": ["-0.1"],
    "train.epochs": ["0", "-1"],
    "train.logp_chunk_size": ["0", "-1"],
    "train.compute_dtype": ["float8", "''"],
    "train.remat": ["some", "''"],
    "train.seed": ["-1", "4294967296"],
    "spa.rounds": ["-1"],
    "spa.prompts_per_round": ["[]", "[0]", "[8000, -5]"],
    "spa.seed_epochs": ["0", "-1"],
    "spa.round_epochs": ["0", "-1"],
    "spa.samples_per_prompt": ["1", "0", "-2"],
    "spa.extrapolation_lambdas": ["[]", "[-0.5]", "[0.5, -0.25]"],
    "spa.noise_quantile": ["0", "1", "-0.1", "1.5"],
    "spa.margin_window": ["0", "-1"],
    "spa.smoothing_alpha": ["-0.1", "0.5", "1.5"],
    "spa.flag_warmup_ratio": ["-0.1", "1.5"],
    "spa.label_mode": ["wild", "''"],
    "spa.truncated_policy": ["maybe", "''"],
    "spa.judge_reward": ["max", "''"],
    "spa.judge_policy": ["init", "''"],
    "spa.sample_policy": ["init", "''"],
    "spa.reference_policy": ["init", "''"],
    "spa.length_control": ["linear", "''"],
    "spa.keep_fraction": ["0", "-0.5", "1.5"],
    "spa.seed_holdout": ["-0.1", "0.6", "1"],
    "spa.lora_rank": ["-1", "-8"],
    "spa.lora_alpha": ["0", "-16"],
    "spa.lora_targets": ["[]", "[attn]", "[q_proj, q_proj]"],
    "dpo.lora_rank": ["-1", "-8"],
    "dpo.lora_alpha": ["0", "-16"],
    "dpo.lora_targets": ["[]", "[attn]", "[q_proj, q_proj]"],
    "ple.iterations": ["0", "-1"],
    "ple.prompts_per_iteration": ["-1"],
    "ple.tau0": ["-0.1"],
    "ple.decay": ["0", "-0.5", "1.5"],
    "ple.principles": ["''", "'   '"],
    "ple.principle_placement": ["middle", "''"],
    "ple.reward": ["''"],
    "ple.reward_normalisation": ["zscore", "''"],
    "ple.reward_range": ["[1]", "[2, 1]", "[1, 1]", "[0, 1, 2]", "[0, .inf]"],
    "ple.ranking_direction": ["worse", "''"],
    "ple.sft_weighting": ["none", "''"],
    "ple.sft_coefficient": ["-1"],
    "ple.epochs": ["0", "-1"],
    "ple.sft_layout": ["csv", "''"],
    "ple.sft_epochs": ["0", "-1"],
    "ple.lora_rank": ["0", "-8"],
    "ple.lora_alpha": ["0", "-16"],
    "ple.lora_targets": ["[]", "[attn]", "[q_proj, q_proj]"],
    "ple.reward_batch_size": ["0", "-1"],
    "eval.judge": ["''"],
    "eval.max_prompts": ["0", "-1"],
    "eval.max_new_tokens": ["0", "-1"],
}
# Values refused by a rule between groups (Config.__post_init__), with the overrides that
# give them something to cross; the field's own dataclass accepts them.
BETWEEN_GROUPS = {
    ("train.batch_size", "30"): ["run.mesh.data=4"],
    ("run.generate_batch_size", "6"): ["run.mesh.data=4"],
    ("run.mesh.data", "3"): [],  # 3 divides neither train.batch_size nor generate_batch_size
}

# Fields for which every value of the right type is valid: only the wrong-type values
# apply to them.
TYPE_ONLY = {
    "run.progress",  # a boolean switch
    "run.compile_cache",
    "data.use_chat_template",
    "sampling.greedy",
    "sampling.return_logprobs",
    "sampling.shrink_batch",  # true, false or null (null: on for the CPU)
    "train.pack_sequences",
    "spa.refine",
    "spa.judge_from_sampler",
    "ple.sft_data",  # free text: a path, "demo", or empty for no SFT stage
    "eval.enabled",
    "eval.greedy",
}


def leaf_fields(cls=Config, prefix=""):
    """``(dotted key, type hint, owning dataclass)`` of every leaf field, groups recursed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], cls


LEAVES = list(leaf_fields())
CASES = [
    (key, text)
    for key, tp, _ in LEAVES
    for text in WRONG_TYPE.get(tp, []) + OUT_OF_RANGE.get(key, [])
]


def test_every_field_has_bad_values():
    keys = {key for key, _, _ in LEAVES}
    classes = {cls for _, _, cls in LEAVES}
    assert {SamplingConfig, TrainConfig, MeshConfig, RunConfig, SPAConfig, PLEConfig} <= classes
    assert len(keys) == len(LEAVES)
    untyped = {key: tp for key, tp, _ in LEAVES if tp not in WRONG_TYPE}
    assert not untyped, f"add wrong-type values for these fields' types: {untyped}"
    missing = keys - set(OUT_OF_RANGE) - TYPE_ONLY
    assert not missing, f"add out-of-range values (or a TYPE_ONLY entry) for {sorted(missing)}"
    assert not (set(OUT_OF_RANGE) | TYPE_ONLY) - keys, "entries for fields that do not exist"
    assert not set(OUT_OF_RANGE) & TYPE_ONLY
    assert all(OUT_OF_RANGE.values())
    assert set(BETWEEN_GROUPS) <= set(CASES)


def _overrides(key, text):
    return [*BETWEEN_GROUPS.get((key, text), []), f"{key}={text}"]


@pytest.mark.parametrize("key, text", CASES)
def test_every_bad_value_is_refused_naming_its_key(key, text):
    with pytest.raises(ConfigError) as e:
        load_config(None, _overrides(key, text))
    message = str(e.value)
    assert key in message and "got" in message, message


@pytest.mark.parametrize("key, text", [c for c in CASES if c not in BETWEEN_GROUPS])
def test_every_bad_value_is_refused_by_its_dataclass_too(key, text):
    """Built in Python (no YAML coercion), each group refuses the same values."""
    owner = {k: cls for k, _, cls in LEAVES}[key]
    with pytest.raises(ConfigError, match=re.escape(key)):
        owner(**{key.rsplit(".", 1)[1]: yaml.safe_load(text)})


def test_each_default_passes_as_an_override():
    # The bad values above are refused for what they are, not because overriding the field
    # fails whatever the value.
    defaults = to_dict(Config())

    def walk(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    for key, value in walk(defaults):
        assert load_config(None, [f"{key}={json.dumps(value)}"]) == Config(), key


def test_no_bad_value_reaches_model_loading(monkeypatch, capsys):
    """``jaxalign run`` and ``jaxalign dpo`` stop each bad value with exit status 2 and the
    key, before any model is loaded or any algorithm starts."""
    from jaxalign import cli, loading
    from jaxalign.algorithms import ple, spa

    def must_not_run(*args, **kwargs):
        raise AssertionError("a bad config value reached model loading")

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    for target in (spa, ple):
        monkeypatch.setattr(target, "run", must_not_run)
    monkeypatch.setattr(loading, "load", must_not_run)
    checked = 0
    for key, text in CASES:
        for command in ("run", "dpo"):
            assert cli.main([command, *_overrides(key, text)]) == 2, (command, key, text)
            err = capsys.readouterr().err
            assert err.startswith(f"jaxalign {command}: ") and key in err, (key, text, err)
            checked += 1
    assert checked == 2 * len(CASES)


# ----------------------------------------------------------------------------- between fields


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # Each global batch (and micro-batch) is split over the data x fsdp shards.
        (["run.mesh.data=4", "train.batch_size=30"], ["train.batch_size", "run.mesh.data (4)"]),
        (
            ["run.mesh.data=4", "train.batch_size=8", "train.micro_batches=4"],
            ["train.micro_batches (4) x run.mesh.data (4)", "= 16, got 8"],
        ),
        # With data=-1 the fixed fsdp axis still has to divide the batch.
        (["run.mesh.fsdp=4", "train.batch_size=30"], ["run.mesh.fsdp (4)", "got 30"]),
        (["run.mesh.data=4", "run.generate_batch_size=6"], ["run.generate_batch_size", "got 6"]),
        (["run.mesh.data=1", "run.mesh.fsdp=-1", "run.mesh.tensor=-1"], ["at most one"]),
        (["sampling.greedy=true"], ["sampling.greedy", "run.algorithm=spa"]),
        (
            ["ple.reward_range=[0, 2]", "ple.reward_normalisation=sigmoid"],
            ["ple.reward_range", "minmax"],
        ),
        (["sampling.greedy=false", "sampling.temperature=0"], ["sampling.temperature"]),
    ],
)
def test_rules_between_fields(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.dtype=float16", "model.param_dtype=bfloat16"],  # what the model code runs in
        ["spa.rounds=0", "ple.prompts_per_iteration=0", "run.checkpoint_every=0"],
        ["spa.rounds=1"],  # prompts_per_round and lambdas for three rounds: the rest unused
        ["spa.rounds=5", "spa.prompts_per_round=[10]"],  # the last entry repeats
        ["spa.smoothing_alpha=0", "spa.extrapolation_lambdas=[0]", "train.warmup_ratio=1"],
        ["train.batch_size=30"],  # data=-1: checked against the devices when the mesh is made
        ["run.mesh.data=-1", "run.mesh.fsdp=2", "train.batch_size=30", "run.generate_batch_size=2"],
        ["train.remat=null", "train.compute_dtype=null", "model.cache_dir=null"],
        ["train.remat=true"],
        ["train.remat=full"],
        ["sampling.greedy=true", "sampling.temperature=0", "run.algorithm=ple"],
        ["ple.reward_range=[]", "ple.reward_normalisation=sigmoid", "ple.sft_data=''"],
        ["ple.lora_targets=q_proj"],  # one name is a list of one
        ["train.learning_rate=1e-6", "sampling.top_p=1", "sampling.min_p=1"],
        ["sampling.max_new_tokens=512", "data.max_response_tokens=64"],  # cut, and counted
    ],
)
def test_valid_edges_are_accepted(overrides):
    load_config(None, overrides)


def test_python_lists_are_stored_as_tuples():
    spa = SPAConfig(prompts_per_round=[5, 6], extrapolation_lambdas=[0.5])
    assert spa.prompts_per_round == (5, 6) and spa.extrapolation_lambdas == (0.5,)
    assert hash(spa) == hash(SPAConfig(prompts_per_round=(5, 6), extrapolation_lambdas=(0.5,)))


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_moved_ple_export_key_says_what_replaced_it(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"ple.export_hf={value}"])
    message = str(e.value)
    assert "'ple.export_hf' is now run.export_hf (last | all | none)" in message
    assert "false is run.export_hf=none" in message
    assert load_config(None, ["run.export_hf=none"]).run.export_hf == "none"
