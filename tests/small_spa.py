"""The config of a small SPA run on the tiny model (one round of 8 prompts, 8 fake devices),
shared by the tests that run one end to end, and the slices of the demo data it reads."""

from jaxalign.data.records import DEMO_FILES


def write_small_demo_data(root):
    """``seed.jsonl`` (8 demo pairs), ``prompts.jsonl`` (8) and ``eval.jsonl`` (4) in ``root``."""
    for name, key, count in (("seed", "pairs", 8), ("prompts", "prompts", 8), ("eval", "eval", 4)):
        lines = DEMO_FILES[key].read_text().splitlines()[:count]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def small_spa_overrides(model, seed, prompts, evals, out) -> list[str]:
    """``key=value`` overrides: ``model`` a model folder, the three data files, ``out`` the run."""
    return [
        f"model.name={model}",
        f"data.seed_pairs={seed}",
        f"data.prompts={prompts}",
        f"data.eval_prompts={evals}",
        "data.max_prompt_tokens=48",
        "data.max_response_tokens=16",
        "sampling.max_new_tokens=16",
        "train.batch_size=4",
        "train.learning_rate=1e-3",
        "train.logp_chunk_size=32",
        "spa.rounds=1",
        "spa.prompts_per_round=[8]",
        "spa.seed_epochs=1",
        "spa.margin_window=8",
        "eval.max_prompts=4",
        "eval.max_new_tokens=16",
        "run.generate_batch_size=4",
        "run.progress=false",
        "run.mesh.data=2",  # 8 fake devices: the whole loop runs sharded
        "run.mesh.fsdp=2",
        "run.mesh.tensor=2",
        f"run.output_dir={out}",
    ]
