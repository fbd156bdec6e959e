"""PLE end to end on a tiny random model: artifacts, the SFT stage, reward-model judges,
export, and resume after a crash (between stages and inside a train stage)."""

import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.algorithms import ple, stages


@pytest.fixture(scope="module")
def ple_run(tmp_path_factory, tiny_model_dir):
    from jaxalign.config import load_config
    from jaxalign.data.records import DEMO_FILES

    root = tmp_path_factory.mktemp("ple")
    prompts = DEMO_FILES["prompts"].read_text().splitlines()[:8]
    (root / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    evals = DEMO_FILES["eval"].read_text().splitlines()[:4]
    (root / "eval.jsonl").write_text("\n".join(evals) + "\n")
    out = root / "run"

    def config(*extra):
        return load_config(
            None,
            [
                "run.algorithm=ple",
                f"model.name={tiny_model_dir}",
                f"data.prompts={root / 'prompts.jsonl'}",
                f"data.eval_prompts={root / 'eval.jsonl'}",
                "data.max_prompt_tokens=96",
                "data.max_response_tokens=16",
                "sampling.max_new_tokens=16",
                "train.batch_size=4",
                "train.learning_rate=1e-3",
                "train.logp_chunk_size=32",
                "ple.iterations=2",
                "ple.reward=demo-checker",
                "ple.reward_range=[0, 2]",
                "ple.sft_weighting=softmax",  # a random model scores 0: "reward" weights are 0
                "ple.lora_rank=2",
                "eval.max_prompts=4",
                "eval.max_new_tokens=16",
                "run.generate_batch_size=4",
                "run.progress=false",
                "run.mesh.data=2",  # 8 fake devices: the whole loop runs sharded
                "run.mesh.fsdp=2",
                "run.mesh.tensor=2",
                f"run.output_dir={out}",
                *extra,
            ],
        )

    summary = ple.run(config(), log=lambda m: None)
    return out, summary, config


def test_run_writes_artifacts_and_report(ple_run):
    out, summary, _ = ple_run
    for name in ("config.yaml", "state.json", "metrics.jsonl", "summary.md", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "round_1" / "model_hf" / "config.json").is_file()  # run.export_hf=last
    assert not (out / "round_0" / "model_hf").exists()
    state = json.loads((out / "state.json").read_text())["stages"]
    for t in (0, 1):
        cands = [
            json.loads(x) for x in (out / f"round_{t}/candidates.jsonl").read_text().splitlines()
        ]
        assert len(cands) == 8 and all("principle_response" in c for c in cands)
        sc = state[f"round_{t}/score"]["result"]
        assert sc["tau"] == pytest.approx(0.2 * 0.9**t)
        assert (
            sc["count/considered"]
            == 8
            == (sc["count/ranking"] + sc["count/sft"] + sc["count/skipped_empty"])
        )
        assert sc["ranking_fraction"] + sc["sft_fraction"] <= 1.0
        scored = [json.loads(x) for x in (out / f"round_{t}/scored.jsonl").read_text().splitlines()]
        for r in scored:  # demo-checker scores 0..2, normalised by the fixed range [0, 2]
            assert r["normalised"] == pytest.approx(r["reward"] / 2)
            big = abs(r["gap"]) > sc["tau"]
            assert r["route"] == (
                "skipped" if r["route"] == "skipped" else ("ranking" if big else "sft")
            )
        train = state[f"round_{t}/train"]["result"]
        assert train["steps"] == train["batches"] >= 1  # softmax weights are never 0
        # The sample stage's record counts what it decoded; the train stage decodes nothing.
        decoding = state[f"round_{t}/sample"]["decoding"]
        assert decoding["decoded_tokens"] >= decoding["sampled_tokens"] > 0
        assert summary["stage_decoding"][f"round_{t}/sample"] == decoding
        assert "decoding" not in state[f"round_{t}/train"]
        assert (out / f"round_{t}/lora").exists()
    rows = summary["iterations"]
    assert [r["iteration"] for r in rows] == ["start", 0, 1]
    md = (out / "summary.md").read_text()
    assert md.startswith("# PLE run summary\n\n")
    assert "→ ranking" in md and "τ_t" in md
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["tag"] for m in metrics} == {"round_0/train", "round_1/train"}


def test_exported_model_is_base_plus_adapters(ple_run, tiny_model_dir):
    """The exported folder loads as an ordinary model and equals base ⊕ final adapters; the
    run directory and each iteration's adapter folder load as that merged model too."""
    from jaxalign.checkpoint import load_params
    from jaxalign.models import load as load_model
    from jaxalign.models import lora

    out, _, _ = ple_run
    base, _ = load_model(str(tiny_model_dir))
    exported, _ = load_model(str(out / "round_1" / "model_hf"))
    ids = jnp.asarray([[1, 20, 300, 4000, 5]], jnp.int32)
    merged = {}
    for t in (0, 1):
        adapters = lora.LoraAdapters(base, rank=2, rngs=nnx.Rngs(0))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(adapters)
        )
        nnx.update(adapters, load_params(out / f"round_{t}" / "lora", abstract))
        merged[t] = np.asarray(lora.merged_model(base, adapters, lora.lora_scaling(2, 16))(ids)[0])
    np.testing.assert_allclose(np.asarray(exported(ids)[0]), merged[1], atol=1e-5)
    assert np.abs(np.asarray(exported(ids)[0]) - np.asarray(base(ids)[0])).max() > 0
    for path, t in ((out, 1), (out / "round_0", 0), (out / "round_0" / "lora", 0)):
        model, _ = load_model(str(path))
        np.testing.assert_allclose(np.asarray(model(ids)[0]), merged[t], atol=1e-5, err_msg=path)
    with pytest.raises(ValueError, match="keeps a round's model in round_K/lora/, not model/"):
        load_model(str(out / "round_0" / "model"))


def test_exported_card_names_ple_and_its_iterations(ple_run):
    import yaml

    out, _, _ = ple_run
    card = (out / "round_1" / "model_hf" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "jaxalign" and "ple" in meta["tags"]
    assert "https://arxiv.org/abs/2408.02599" in card
    assert "after iteration 1 of a run planned for iterations 0–1" in card
    assert "| iteration | queries | ranking pairs | weighted-SFT examples | steps |" in card
    summary = (out / "summary.md").read_text().split("\n", 2)[2].strip()
    assert summary in card  # the run's table, whole


def test_rerun_of_a_finished_run_redoes_nothing(ple_run):
    out, _, config = ple_run
    before = json.loads((out / "state.json").read_text())["stages"]
    ple.run(config(), log=lambda m: None)
    assert json.loads((out / "state.json").read_text())["stages"] == before
    with pytest.raises(ValueError, match="ple.tau0"):
        ple.run(config("ple.tau0=0.5"), log=lambda m: None)


def _iteration_outputs(out):
    files = ("candidates.jsonl", "scored.jsonl", "eval.jsonl")
    return {f"{t}/{f}": (out / f"round_{t}" / f).read_text() for t in (0, 1) for f in files}


# (stage function, which of its calls dies): within iteration 0, in iteration 1 after a
# finished iteration 0 (whose adapters must then be loaded back), and in the final export.
CRASHES = [("train_stage", 1), ("sample_stage", 2), ("score_stage", 2), ("export_stage", 1)]


@pytest.mark.parametrize("stage,call", CRASHES)
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    ple_run, tmp_path, monkeypatch, stage, call
):
    """A run killed right after a stage wrote its files, but before it was recorded as
    finished, resumes: finished stages are not redone and every artifact, the exported
    model included, equals the uninterrupted run's."""
    done, _, config = ple_run
    out = tmp_path / "run"
    module = stages if stage == "export_stage" else ple
    original = getattr(module, stage)
    calls = []

    def crashing(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(stage)
        if len(calls) == call:
            raise KeyboardInterrupt("simulated kill")
        return result

    with monkeypatch.context() as m:
        m.setattr(module, stage, crashing)
        with pytest.raises(KeyboardInterrupt):
            ple.run(config(f"run.output_dir={out}"), log=lambda msg: None)
    state_path = out / "state.json"
    before = json.loads(state_path.read_text())["stages"]  # every crash point follows a stage
    ple.run(config(f"run.output_dir={out}"), log=lambda msg: None)
    after = json.loads(state_path.read_text())["stages"]
    for key, entry in before.items():
        assert after[key] == entry
    assert after.keys() == json.loads((done / "state.json").read_text())["stages"].keys()
    assert _iteration_outputs(out) == _iteration_outputs(done)
    for name in ("model.safetensors", "config.json"):
        exported = [d / "round_1" / "model_hf" / name for d in (out, done)]
        assert exported[0].read_bytes() == exported[1].read_bytes()


def _lora(out, t, tiny_model_dir):
    """Iteration ``t``'s saved adapters, as arrays."""
    from jaxalign.checkpoint import load_params
    from jaxalign.models import load as load_model
    from jaxalign.models import lora

    base, _ = load_model(str(tiny_model_dir))
    adapters = lora.LoraAdapters(base, rank=2, rngs=nnx.Rngs(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(adapters))
    return jax.tree.leaves(load_params(out / f"round_{t}" / "lora", abstract))


def test_train_stage_killed_mid_way_resumes_to_the_same_adapters(
    ple_run, tmp_path, monkeypatch, tiny_model_dir
):
    """With ``run.checkpoint_every=1``, a run killed inside iteration 0's training, right
    after its first train-state checkpoint, resumes from that step (not from the start of
    the stage) and ends with the uninterrupted run's adapters and artifacts."""
    from jaxalign import checkpoint

    done, _, config = ple_run
    out = tmp_path / "run"
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, state, extra=None):
        save(self, step, state, extra)
        if self.directory.parent.name == "round_0" and step == 1:
            self.wait()
            raise KeyboardInterrupt("simulated kill")

    cfg = config(f"run.output_dir={out}", "run.checkpoint_every=1")
    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpointer, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            ple.run(cfg, log=lambda msg: None)
    assert "round_0/train" not in json.loads((out / "state.json").read_text())["stages"]
    logs = []
    ple.run(cfg, log=logs.append)
    state = json.loads((out / "state.json").read_text())["stages"]
    steps = state["round_0/train"]["result"]["steps"]
    assert steps >= 2  # killed mid-way, not at the end
    assert f"resuming from step 1 of {steps} ({out / 'round_0' / 'checkpoints'})" in logs
    for t in (0, 1):
        for a, b in zip(_lora(out, t, tiny_model_dir), _lora(done, t, tiny_model_dir), strict=True):
            np.testing.assert_array_equal(a, b)
    assert _iteration_outputs(out) == _iteration_outputs(done)
    for name in ("model.safetensors", "config.json"):
        exported = [d / "round_1" / "model_hf" / name for d in (out, done)]
        assert exported[0].read_bytes() == exported[1].read_bytes()
    # The stage's metrics are the whole stage's, as in the uninterrupted run.
    want = json.loads((done / "state.json").read_text())["stages"]
    for t in (0, 1):
        got = {k: v for k, v in state[f"round_{t}/train"]["result"].items() if k != "lora"}
        assert got == {k: v for k, v in want[f"round_{t}/train"]["result"].items() if k != "lora"}


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    """A random LlamaForSequenceClassification over SmolLM2's vocabulary (no tokenizer files:
    the run's tokenizer is used)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxalign.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def ple_sft_run(tmp_path_factory, tiny_model_dir, reward_model_dir):
    """One PLE iteration after an initial SFT stage, evaluated by a reward model."""
    from jaxalign.config import load_config
    from jaxalign.data.records import DEMO_FILES

    root = tmp_path_factory.mktemp("ple_sft")
    lines = {"prompts": 4, "eval": 4, "pairs": 6}
    for kind, n in lines.items():
        rows = DEMO_FILES[kind].read_text().splitlines()[:n]
        (root / f"{kind}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [
            "run.algorithm=ple",
            f"model.name={tiny_model_dir}",
            f"data.prompts={root / 'prompts.jsonl'}",
            f"data.eval_prompts={root / 'eval.jsonl'}",
            "data.max_prompt_tokens=96",
            "data.max_response_tokens=16",
            "sampling.max_new_tokens=16",
            "train.batch_size=2",
            "train.learning_rate=1e-2",
            "train.logp_chunk_size=32",
            "ple.iterations=1",
            f"ple.sft_data={root / 'pairs.jsonl'}",
            "ple.sft_epochs=2",
            "ple.reward=demo-checker",
            "ple.reward_range=[0, 2]",
            "ple.sft_weighting=softmax",
            "ple.lora_rank=2",
            "run.export_hf=none",
            f"eval.judge={reward_model_dir}",
            "eval.max_prompts=4",
            "eval.max_new_tokens=8",
            "run.generate_batch_size=4",
            "run.progress=false",
            "run.mesh.data=2",  # batches of 2 rows over 2 data shards, params over fsdp x tensor
            "run.mesh.fsdp=1",
            "run.mesh.tensor=4",
            f"run.output_dir={root / 'run'}",
        ],
    )
    summary = ple.run(cfg, log=lambda m: None)
    return root / "run", summary, cfg


def test_sft_stage_trains_the_starting_adapters(ple_sft_run, tiny_model_dir):
    """The iterations and the eval baseline start from base ⊕ SFT adapters, not the base."""
    from jaxalign.algorithms import stages
    from jaxalign.checkpoint import load_params
    from jaxalign.models import load as load_model
    from jaxalign.models import lora
    from jaxalign.parallel import make_mesh

    out, summary, cfg = ple_sft_run
    state = json.loads((out / "state.json").read_text())["stages"]
    sft = state["round_0/sft"]["result"]
    assert sft["read"] == sft["kept"] == 6 and sft["sft_rows"] == 6
    # 6 rows in batches of 2 (more where length buckets split them), two epochs
    assert sft["steps"] == 2 * sft["batches"] and sft["batches"] >= 3
    assert list(state).index("round_0/sft") < list(state).index("round_0/sample")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["tag"] for m in metrics} == {"sft/train", "round_0/train"}
    assert summary["iterations"][0]["iteration"] == "start (SFT)"

    base, tokenizer = load_model(str(tiny_model_dir))
    adapters = lora.LoraAdapters(base, rank=2, rngs=nnx.Rngs(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(adapters))
    sft_adapters = load_params(sft["lora"], abstract)
    graphdef, base_params = nnx.split(base)
    merged = lora.apply_lora(base_params, sft_adapters, lora.lora_scaling(2, 16))
    ctx = types.SimpleNamespace(
        config=cfg,
        tokenizer=tokenizer,
        mesh=make_mesh(2, 1, 4),
        progress=False,
        model=lambda params: nnx.merge(graphdef, params),
    )
    prompts = [json.loads(x) for x in (out.parent / "eval.jsonl").read_text().splitlines()]
    want = stages.greedy_answers(ctx, merged, prompts)
    base_answers = stages.greedy_answers(ctx, base_params, prompts)
    baseline = [
        json.loads(x)["response"] for x in (out / "baseline_eval.jsonl").read_text().splitlines()
    ]
    assert [b["text"] for b in baseline] == [a.text for a in want]
    assert [a.text for a in want] != [a.text for a in base_answers]  # SFT changed the model


def test_reward_model_as_eval_judge(ple_sft_run, reward_model_dir, tiny_model_dir, tmp_path):
    """eval.judge may name a reward-model folder; eval.jsonl holds its rewards."""
    from jaxalign.reward_judge import load_reward_judge
    from jaxalign.tokenizer import Tokenizer

    out, summary, cfg = ple_sft_run
    rows = [json.loads(x) for x in (out / "round_0" / "eval.jsonl").read_text().splitlines()]
    baseline = [
        json.loads(x)["response"] for x in (out / "baseline_eval.jsonl").read_text().splitlines()
    ]
    judge = load_reward_judge(
        str(reward_model_dir),
        tokenizer=Tokenizer.from_pretrained(tiny_model_dir),
        max_prompt_tokens=96,
        max_response_tokens=8,
    )
    prompts = [r["prompt"] for r in rows]
    ours = judge(prompts, [r["response"] for r in rows], finished=[r["finished"] for r in rows])
    base = judge(prompts, [b["text"] for b in baseline], finished=[b["finished"] for b in baseline])
    np.testing.assert_allclose([r["score"] for r in rows], ours, atol=1e-5)
    np.testing.assert_allclose([r["baseline_score"] for r in rows], base, atol=1e-5)
    assert len(set(np.round(ours, 4))) > 1  # real, varying rewards, not a rule's 0/1/2
    e = json.loads((out / "state.json").read_text())["stages"]["round_0/eval"]["result"]
    assert e["gold_score"] == pytest.approx(float(np.mean(ours)), abs=1e-5)

    # `jaxalign eval --judge reward:FOLDER` (a folder with its own tokenizer) scores the same.
    from jaxalign import evaluation
    from jaxalign.judging import Candidate

    folder = tmp_path / "rm"
    shutil.copytree(reward_model_dir, folder)
    for path in tiny_model_dir.iterdir():  # the tokenizer files, chat template included
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, folder / path.name)
    judge = evaluation.make_judge(f"reward:{folder}")
    judge.max_prompt_tokens, judge.max_response_tokens = 96, 8
    records = [{"id": r["id"], "prompt": r["prompt"]} for r in rows]
    a = [Candidate(r["response"], r["finished"]) for r in rows]
    b = [Candidate(x["text"], x["finished"]) for x in baseline]
    got_a, got_b = judge.compare(records, a, b)
    np.testing.assert_allclose(got_a, ours, atol=1e-5)
    np.testing.assert_allclose(got_b, base, atol=1e-5)
    with pytest.raises(ValueError, match="not a folder"):
        evaluation.make_judge(f"reward:{tmp_path / 'missing'}")


def test_ple_sft_config_errors():
    from jaxalign.config import ConfigError, PLEConfig

    with pytest.raises(ConfigError, match="ple.sft_layout"):
        PLEConfig(sft_layout="prompts")
    with pytest.raises(ConfigError, match="sft_epochs"):
        PLEConfig(sft_epochs=0)
