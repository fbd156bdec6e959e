"""What a run leaves behind: SPA's and DPO's exported Hugging Face folders against transformers,
their model cards, ``jaxalign export``, and a run's models taken wherever a model is
(``jaxalign.models.load``, ``jaxalign eval --model``), with clear errors for the rest."""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from small_spa import small_spa_overrides, write_small_demo_data

from jaxalign import cli
from jaxalign.algorithms import spa
from jaxalign.config import load_config
from jaxalign.loading import load

TOKENS = [[1, 20, 300, 4000, 5, 77, 9, 12000]]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_data")
    return write_small_demo_data(root)


def _spa_config(data, model_dir, out, *extra):
    return load_config(
        None,
        [
            *small_spa_overrides(
                model_dir, data / "seed.jsonl", data / "prompts.jsonl", data / "eval.jsonl", out
            ),
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def spa_run(tmp_path_factory, data, tiny_model_dir):
    """A finished two-round SPA run on the tiny model, and what it logged."""
    out = tmp_path_factory.mktemp("spa_export") / "spa"
    lines: list[str] = []
    spa.run(_spa_config(data, tiny_model_dir, out), log=lines.append)
    return out, lines


def _logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS, jnp.int32))[0])


def _torch_logits(folder) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def _card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


# ----------------------------------------------------------------------------- SPA's export


def test_spa_run_logs_its_devices_and_exports_its_last_round(spa_run):
    out, lines = spa_run
    assert lines[0] == "devices: 8 x cpu (1 process); mesh data=2 fsdp=2 tensor=2"
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["round_1/export"]["result"] == {"model_hf": str(out / "round_1" / "model_hf")}
    assert "round_0/export" not in state  # run.export_hf=last
    assert not (out / "round_0" / "model_hf").exists()
    files = sorted(p.name for p in (out / "round_1" / "model_hf").iterdir())
    assert files == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert any(line.startswith("round 1's model: ") for line in lines)


def test_export_loads_in_transformers_with_our_logits_and_chat_template(spa_run):
    """The exported round, read by transformers' torch Llama, gives the logits jaxalign's model
    of the run gives (float32, 1e-4); its tokenizer formats a chat as jaxalign's does."""
    transformers = pytest.importorskip("transformers")
    out, _ = spa_run
    folder = out / "round_1" / "model_hf"
    ours, tokenizer = load(out)
    np.testing.assert_allclose(_torch_logits(folder), _logits(ours), atol=1e-4, rtol=0)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer.encode_prompt(QUESTION)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(tokenizer.eos_token_ids)


def test_model_card_holds_the_run_its_table_and_a_working_snippet(spa_run, tiny_model_dir):
    out, _ = spa_run
    folder = out / "round_1" / "model_hf"
    meta, body = _card(folder)
    assert meta["library_name"] == "jaxalign"
    assert {"jaxalign", "spa"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local folder has no Hub name
    assert "https://arxiv.org/abs/2406.04412" in body
    assert "after round 1 (self-annotated preference data with self-refinement)" in body
    table = (out / "summary.md").read_text().split("\n", 2)[2].strip()
    assert "win rate vs SFT" in table and table in body
    state = json.loads((out / "state.json").read_text())["stages"]
    counts = re.search(r"\| 1 \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", body).groups()
    assert [int(c) for c in counts] == [
        state["round_1/sample"]["result"]["prompts"],
        state["round_1/judge"]["result"]["count/kept"],
        state["round_1/train"]["result"]["pairs"],
        state["round_1/train"]["result"]["steps"],
    ]
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == yaml.safe_load((out / "config.yaml").read_text())
    for tool in ("vllm serve", "convert_hf_to_gguf.py", "AutoModelForCausalLM"):
        assert tool in body
    # The card's transformers snippet runs as printed, on the folder it names.
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'folder = "{folder}"' in snippet
    exec(compile(snippet.replace("max_new_tokens=128", "max_new_tokens=4"), "card", "exec"), {})


def test_export_hf_all_adds_every_round_on_a_rerun_and_redoes_nothing(
    spa_run, data, tiny_model_dir
):
    out, _ = spa_run
    before = json.loads((out / "state.json").read_text())["stages"]
    spa.run(_spa_config(data, tiny_model_dir, out, "run.export_hf=all"), log=lambda m: None)
    after = json.loads((out / "state.json").read_text())["stages"]
    assert set(after) - set(before) == {"round_0/export"}
    assert all(after[k] == v for k, v in before.items())
    round0, _ = load(out / "round_0")
    np.testing.assert_allclose(
        _torch_logits(out / "round_0" / "model_hf"), _logits(round0), atol=1e-4, rtol=0
    )
    assert "after round 0 (DPO on the seed pairs)" in _card(out / "round_0" / "model_hf")[1]


# ----------------------------------------------------------------------------- run models


def test_every_form_of_a_run_path_loads_the_round_it_names(spa_run, tiny_model_dir):
    from jaxalign.weights import load_hf

    out, _ = spa_run
    round1 = _logits(load_hf(out / "round_1" / "model_hf"))
    for path in (out, out / "round_1", out / "round_1" / "model", str(out / "round_1") + "/"):
        np.testing.assert_allclose(_logits(load(path)[0]), round1, atol=1e-6, err_msg=str(path))
    round0 = _logits(load(out / "round_0" / "model")[0])
    base = _logits(load(tiny_model_dir)[0])
    assert np.abs(round0 - round1).max() > 1e-4 and np.abs(round0 - base).max() > 1e-4
    bf16, _ = load(out, param_dtype="bfloat16")
    assert bf16.embed_tokens[...].dtype == jnp.bfloat16


def _copy_run(out, copy, drop=()):
    """The run's config and state (without the ``drop`` stages) in the new folder ``copy``."""
    copy.mkdir()
    shutil.copy(out / "config.yaml", copy / "config.yaml")
    state = json.loads((out / "state.json").read_text())
    state["stages"] = {k: v for k, v in state["stages"].items() if k not in drop}
    (copy / "state.json").write_text(json.dumps(state))
    for i in (0, 1):
        (copy / f"round_{i}").symlink_to(out / f"round_{i}")
    return copy


def test_unfinished_rounds_and_other_folders_are_clear_errors(spa_run, tmp_path):
    out, _ = spa_run
    with pytest.raises(ValueError, match=r"round 5 has not finished training .* rounds: 0, 1\."):
        load(out / "round_5")
    part = _copy_run(
        out, tmp_path / "part", drop={"round_1/train", "round_1/eval", "round_1/export"}
    )
    with pytest.raises(ValueError, match=r"round_1/train in .*state.json\); finished rounds: 0\."):
        load(part / "round_1" / "model")
    np.testing.assert_allclose(  # the run itself: its last finished round, 0
        _logits(load(part)[0]), _logits(load(out / "round_0")[0]), atol=1e-6
    )
    (part / "state.json").write_text('{"stages": {}}')
    with pytest.raises(ValueError, match="no round of this run has finished training yet"):
        load(part)
    with pytest.raises(ValueError, match=r"keeps its models in round_K/model/; pass"):
        load(out / "model")
    with pytest.raises(ValueError, match="keeps a round's model in round_K/model/, not lora/"):
        load(out / "round_1" / "lora")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither config.json .* nor a jaxalign run's config"):
        load(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such file or folder; pass a registered name"):
        load(tmp_path / "nowhere")
    broken = _copy_run(out, tmp_path / "broken")
    config = yaml.safe_load((broken / "config.yaml").read_text())
    config["model"]["name"] = str(tmp_path / "gone")
    (broken / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"config.yaml: the run started from model.name=.*gone"):
        load(broken)


def test_eval_takes_a_run_as_model_and_baseline(spa_run, data, tiny_model_dir, tmp_path, capsys):
    """``jaxalign eval --model RUN_DIR``: the run's last round answers, as its export does."""
    out, _ = spa_run
    common = ["--prompts", str(data / "eval.jsonl"), "--judge", "demo-checker"]
    common += ["--max-new-tokens", "8", "--kl-samples", "0", "--no-progress"]
    argv = ["eval", "--model", str(out), "--baseline", str(tiny_model_dir), *common]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "win rate" in capsys.readouterr().out
    argv = [
        "eval",
        "--model",
        str(out / "round_1" / "model_hf"),
        "--baseline",
        str(out / "round_0"),
    ]
    assert cli.main([*argv, *common, "--out", str(tmp_path / "b")]) == 0
    a, b = (
        [json.loads(x) for x in (tmp_path / d / "answers.jsonl").read_text().splitlines()]
        for d in ("a", "b")
    )
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert cli.main(["eval", "--model", str(out / "round_9"), "--baseline", str(out), *common]) == 1
    assert "round 9 has not finished training" in capsys.readouterr().err


# ----------------------------------------------------------------------------- jaxalign export


def test_export_command_writes_any_round_in_the_dtype_asked(spa_run, tmp_path, capsys):
    from safetensors.numpy import load_file

    out, _ = spa_run
    target = tmp_path / "r0"
    argv = ["export", str(out), "--round", "0", "--out", str(target), "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith(f"{target}: spa round 0 from {out / 'round_0'}")
    tensors = load_file(target / "model.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    want = _logits(load(out / "round_0")[0])
    np.testing.assert_allclose(_torch_logits(target), want, atol=0.05, rtol=0.05)
    meta, body = _card(target)
    assert meta["model_name"] == f"{out.name} round 0" and "Exported tensors: bfloat16" in body
    assert "win rate vs SFT" in body  # the run's summary table, read from summary.md
    # float32 after the fact: the same bytes as the run's own export of its last round.
    assert cli.main(["export", str(out), "--out", str(tmp_path / "last")]) == 0
    same = (tmp_path / "last" / "model.safetensors").read_bytes()
    assert same == (out / "round_1" / "model_hf" / "model.safetensors").read_bytes()


def test_export_command_refuses_what_it_cannot_do(spa_run, tmp_path, tiny_model_dir, capsys):
    out, _ = spa_run
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    cases = [
        (["export", str(out), "--round", "3", "--out", str(tmp_path / "x")], "round 3 has not"),
        (["export", str(tiny_model_dir), "--out", str(tmp_path / "x")], "not a jaxalign run"),
        (["export", str(out), "--out", str(busy)], "exists and is not an exported model"),
        (["export", str(out), "--out", str(out / "elsewhere")], "is inside the run directory"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
    assert (busy / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- DPO


def test_dpo_command_exports_model_hf_and_its_run_loads(data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    argv = ["dpo", "--pairs", str(data / "seed.jsonl"), "--output-dir", str(out)]
    argv += ["--save-every", "0", f"model.name={tiny_model_dir}", "train.batch_size=4"]
    argv += ["train.epochs=1", "train.learning_rate=1e-3", "train.logp_chunk_size=32"]
    argv += ["data.max_prompt_tokens=48", "data.max_response_tokens=16", "run.progress=false"]
    argv += ["run.mesh.data=2", "run.mesh.fsdp=2", "run.mesh.tensor=2"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "devices: 8 x cpu (1 process); mesh data=2 fsdp=2 tensor=2"
    assert f"model: {out / 'model_hf'} (a Hugging Face folder, README.md card)" in err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["run"]["algorithm"] == "dpo"
    assert config["data"]["seed_pairs"] == str(data / "seed.jsonl")  # --pairs, as it ran
    ours, _ = load(out)
    np.testing.assert_allclose(_torch_logits(out / "model_hf"), _logits(ours), atol=1e-4, rtol=0)
    assert np.abs(_logits(ours) - _logits(load(tiny_model_dir)[0])).max() > 1e-4
    meta, body = _card(out / "model_hf")
    assert "dpo" in meta["tags"] and "https://arxiv.org/abs/2305.18290" in body
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_read"] == summary["pairs_kept"] == summary["pairs_trained"] == 8
    assert "| 8 | 8 | 0 | 8 |" in body
    assert cli.main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert again == (out / "model_hf" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="a DPO run has no rounds"):
        load(out / "round_0")
    shutil.rmtree(out / "model")
    with pytest.raises(
        ValueError, match=r"this DPO run has not finished .*rerun its `jaxalign dpo`"
    ):
        load(out)
