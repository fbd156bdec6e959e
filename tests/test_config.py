"""Config loading: YAML groups, dotted overrides, errors that name file and key."""

import pathlib

import pytest

from jaxalign.config import Config, ConfigError, load_config, parse_overrides, save_config

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


@pytest.mark.parametrize("name", ["demo_smollm2.yaml", "spa_zephyr7b_ultrafeedback.yaml"])
def test_shipped_configs_load(name):
    c = load_config(ROOT / "configs" / name)
    assert c.run.algorithm == "spa"


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
