"""Model cards: the Hub's front matter, the body's sections, and where base model, licence and
datasets come from."""

from __future__ import annotations

import json

import pytest
import yaml

from jaxalign import model_card
from jaxalign.algorithms import stages
from jaxalign.config import load_config, to_dict
from jaxalign.loading import Provenance, hub_id_of_path, provenance

SPA_STAGES = {
    "round_0/train": {"result": {"pairs": 54, "steps": 21}},
    "round_1/sample": {"result": {"prompts": 48}},
    "round_1/judge": {"result": {"count/kept": 45}},
    "round_1/train": {"result": {"pairs": 45, "steps": 6}},
    "round_2/sample": {"result": {"prompts": 64}},  # round 2 has not trained yet
}


def _split(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_an_embedded_base_gives_base_model_and_license_and_hub_data_gives_datasets():
    config = to_dict(
        load_config(
            None,
            [
                "data.seed_pairs=HuggingFaceH4/ultrafeedback_binarized",
                "data.prompts=/data/hub/datasets--HuggingFaceH4--ultrafeedback_binarized/x.jsonl",
            ],
        )
    )
    facts = stages.card_facts(config, SPA_STAGES, 1, name="spa round 1", summary_table="| a |")
    meta, body = _split(model_card.render(facts, folder="out/round_1/model_hf"))
    assert meta == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "jaxalign",
        "license": "apache-2.0",
        "datasets": ["HuggingFaceH4/ultrafeedback_binarized"],
        "model_name": "spa round 1",
        "tags": ["jaxalign", "spa", "alignment", "preference-optimization", "jax"],
        "pipeline_tag": "text-generation",
    }
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/" in body
    assert "| 0 (seed pairs) | - | - | 54 | 21 |" in body
    assert "| 1 | 48 | 45 | 45 | 6 |" in body
    assert "| 2 |" not in body  # not trained: not in the data table
    assert "had finished training at export: 0, 1." in body
    assert "## Evaluation" in body and "| a |" in body
    assert 'folder = "out/round_1/model_hf"' in body


def test_a_run_without_evaluation_has_no_evaluation_section():
    config = to_dict(load_config(None, ["eval.enabled=false"]))
    facts = stages.card_facts(config, SPA_STAGES, 0, name="n")
    _, body = _split(model_card.render(facts))
    assert "## Evaluation" not in body
    assert "after round 0 (DPO on the seed pairs) of a run planned for rounds 0–3" in body


def test_ple_and_dpo_cards_name_their_method_and_data():
    ple = to_dict(load_config(None, ["run.algorithm=ple", "ple.iterations=2"]))
    results = {
        "round_0/sft": {"result": {"sft_rows": 54, "steps": 7}},
        "round_0/sample": {"result": {"prompts": 40}},
        "round_0/train": {"result": {"ranking_pairs": 10, "sft_rows": 60, "steps": 9}},
    }
    meta, body = _split(model_card.render(stages.card_facts(ple, results, 0, name="p")))
    assert "ple" in meta["tags"] and "arxiv.org/abs/2408.02599" in body
    assert "| SFT on D_sft | - | - | 54 | 7 |" in body and "| 0 | 40 | 10 | 60 | 9 |" in body
    assert "LoRA adapters merged into the base weights" in body
    dpo = to_dict(load_config(None, ["run.algorithm=dpo"]))
    counts = {"pairs_read": 9, "pairs_kept": 8, "pairs_skipped": 1, "pairs_trained": 8}
    meta, body = _split(
        model_card.render(stages.card_facts(dpo, counts | {"steps": 3}, None, name="d"))
    )
    assert "dpo" in meta["tags"] and "arxiv.org/abs/2305.18290" in body
    assert "| 9 | 8 | 1 | 8 | 3 |" in body and "jaxalign dpo --config config.yaml" in body


def test_an_unknown_algorithm_has_no_card():
    config = to_dict(load_config(None, []))
    facts = stages.card_facts(config, {}, 0, name="n")
    with pytest.raises(ValueError, match="no model card for algorithm 'sft'"):
        model_card.render(facts.__class__(**{**facts.__dict__, "algorithm": "sft"}))


def test_provenance_of_folders_and_runs(tmp_path):
    assert hub_id_of_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert hub_id_of_path("/data/zephyr-7b-sft-full") is None
    cached = tmp_path / "models--HuggingFaceH4--zephyr-7b-sft-full" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert provenance(cached).hub_id == "HuggingFaceH4/zephyr-7b-sft-full"
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2-0.5B"}))
    (local / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: x/y\n---\n# hi\n")
    # The folder's own Hub name, not its card's base_model (that is the folder's parent).
    assert provenance(local) == Provenance("Qwen/Qwen2-0.5B", "apache-2.0")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"run": {"algorithm": "spa"}, "model": {"name": str(local)}})
    )
    assert provenance(run).hub_id is None  # a run's own model is on no Hub
    assert provenance(run).license == "apache-2.0"  # but inherits its base's licence
    assert provenance(tmp_path / "nothing") == Provenance(None, None)
    assert provenance("smollm2-135m-instruct").license == "apache-2.0"
