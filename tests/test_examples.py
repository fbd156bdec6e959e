"""The functional-API example runs end to end (on the tiny model)."""

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "spa_functional.py"


def test_spa_functional_example_runs(tiny_model_dir, capsys):
    spec = importlib.util.spec_from_file_location("spa_functional", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        [
            "--model",
            str(tiny_model_dir),
            "--steps",
            "1",
            "--prompts",
            "8",
            "--max-new-tokens",
            "8",
            "--learning-rate",
            "1e-3",
        ]
    )
    out = capsys.readouterr().out
    assert "round 0: DPO on seed pairs" in out and "round 1: judged 8 prompts" in out
