"""Throughput metrics: what each logged step carries, the peaks MFU is measured against,
and the loop reading a step's metrics only after the next step is dispatched."""

import json
import math
import types

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_pairs import TINY, tiny_batches

from jaxalign import loop, parallel, throughput, training
from jaxalign.models.llama import Transformer
from jaxalign.report import MetricsWriter

CONFIG = training.TrainConfig(learning_rate=1e-3, epochs=2, batch_size=4, logp_chunk_size=8)


def test_step_throughput_by_hand():
    perf = throughput.step_throughput(2.0, 1000, 18e9, peak=1e12)
    assert perf["perf/step_seconds"] == 2.0
    assert perf["perf/tokens_per_second"] == 500.0
    assert math.isclose(perf["perf/model_tflops_per_second"], 18e9 / 2 / 1e12)
    assert math.isclose(perf["perf/mfu"], 18e9 / 2 / 1e12)
    assert "perf/mfu" not in throughput.step_throughput(2.0, 1000, 18e9, peak=None)


def test_model_flops_by_hand():
    """Two sequences of 3 and 5 tokens, N = 1e6, W = layers·heads·head size = 2·4·8 = 64:
    a pass is 2·N·8 + 2·W·(9 + 25); a step three passes by default."""
    batch = {
        "chosen_attention_mask": np.array([[1, 1, 1, 0, 0]]),
        "rejected_attention_mask": np.array([[1, 1, 1, 1, 1]]),
        "chosen_ids": np.ones((1, 5)),
    }
    assert throughput.batch_squares(batch) == 34
    one_pass = 2 * 1e6 * 8 + 2 * 64 * 34
    assert throughput.model_flops(8, 34, 1_000_000, 64) == 3 * one_pass
    assert throughput.model_flops(8, 34, 1_000_000, 64, passes=4) == 4 * one_pass
    assert throughput.model_flops(8, 34, 1_000_000, 64, passes=1) == one_pass
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(num_layers=2, num_heads=4, head_dim=8, hidden_size=99)
    )
    assert throughput.attention_width(model) == 64
    model.config.head_dim, model.config.hidden_size = None, 32  # hidden // heads = 8
    assert throughput.attention_width(model) == 64
    assert throughput.attention_width(object()) == 0
    small = Transformer(TINY, rngs=nnx.Rngs(0))
    head = TINY.head_dim or TINY.hidden_size // TINY.num_heads
    assert throughput.attention_width(small) == TINY.num_layers * TINY.num_heads * head


def test_batch_tokens_counts_every_row_kind():
    batch = {
        "chosen_attention_mask": np.array([[1, 1, 0], [1, 0, 0]]),
        "rejected_attention_mask": np.array([[1, 1, 1], [0, 0, 0]]),
        "sft_attention_mask": np.array([[1, 0]]),
        "chosen_ids": np.ones((2, 3)),
    }
    assert throughput.batch_tokens(batch) == 7


def test_nominal_peaks_scale_with_chips_and_unknown_kinds_have_none():
    tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
    assert throughput.peak_flops([tpu] * 8, None) == 8 * 197e12
    odd = types.SimpleNamespace(platform="gpu", device_kind="Some Future GPU")
    assert throughput.peak_flops([odd], None) is None
    assert throughput.peak_flops([], None) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(throughput, "measure_cpu_matmul_peak", lambda: calls.append(1) or 123e9)
    cpu = jax.devices("cpu")
    assert throughput.peak_flops(cpu, tmp_path) == 123e9
    assert throughput.peak_flops(cpu, tmp_path) == 123e9
    assert len(calls) == 1
    assert json.loads((tmp_path / "peak_flops.json").read_text())


def test_every_logged_step_has_throughput_and_results_do_not(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "measure_cpu_matmul_peak", lambda: 50e9)
    monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path / "cache"))
    batches, result = _train_tiny(MetricsWriter(tmp_path / "metrics.jsonl"))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 2 * len(batches) + 1))
    size = throughput.parameter_count(nnx.state(Transformer(TINY, rngs=nnx.Rngs(0))))
    width = throughput.attention_width(Transformer(TINY, rngs=nnx.Rngs(0)))
    work = {
        throughput.batch_tokens(b): throughput.model_flops(
            throughput.batch_tokens(b), throughput.batch_squares(b), size, width
        )
        for b in batches
    }
    for row in rows:
        assert row["perf/step_seconds"] > 0
        done = row["perf/tokens_per_second"] * row["perf/step_seconds"]
        tokens = next(t for t in work if done == pytest.approx(t))  # that step's batch's
        flops = row["perf/model_tflops_per_second"] * row["perf/step_seconds"] * 1e12
        assert flops == pytest.approx(work[tokens])
        assert row["perf/mfu"] == pytest.approx(flops / row["perf/step_seconds"] / 50e9)
    assert not any(k.startswith("perf/") for k in result.summary())


def _dpo_loss():
    return training.dpo_loss_fn(CONFIG)


def _train_tiny(metrics=None):
    """Two epochs of DPO on the tiny model on one device; ``(batches, TrainResult)``."""
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model, batches = _model_and_batches()
    result = loop.train(
        model,
        batches,
        CONFIG,
        mesh,
        loss_fn=_dpo_loss(),
        epochs=2,
        metrics=metrics,
        progress=False,
        log=lambda m: None,
    )
    return batches, result


def _model_and_batches():
    """The tiny model and its pair batches with the reference log-probs precomputed."""
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batches = [
        {
            **b,
            **{
                k: np.asarray(v)
                for k, v in training.compute_reference_logps(
                    graphdef, params, b, chunk_size=8
                ).items()
            },
        }
        for b in tiny_batches(8)
    ]
    return model, batches


def test_a_steps_metrics_are_read_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
    """The host runs one step ahead: step k's metrics are fetched only once step k+1 has
    been dispatched (except where a checkpoint needs them first), and the logged numbers
    equal those of each step's own output."""
    events = []
    make = training.make_train_step

    def counting_make(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def run(state, batch, *rest):
            out = step_fn(state, batch, *rest)
            events.append(("dispatch", id(out[1])))
            return out

        return run

    device_get = jax.device_get

    def counting_get(x):
        events.append(("get", id(x)))
        return device_get(x)

    monkeypatch.setattr(training, "make_train_step", counting_make)
    monkeypatch.setattr(loop.jax, "device_get", counting_get)
    _train_tiny()
    order = [kind for kind, _ in events if kind in ("dispatch", "get")]
    dispatched = [key for kind, key in events if kind == "dispatch"]
    fetched = [key for kind, key in events if kind == "get" and key in dispatched]
    assert fetched == dispatched  # every step's metrics, in order
    steps = [i for i, kind in enumerate(order) if kind == "dispatch"]
    gets = [i for i, (kind, key) in enumerate(events) if kind == "get" and key in dispatched]
    for k in range(len(steps) - 1):
        assert gets[k] > steps[k + 1], "step k's metrics were read before step k+1 was dispatched"


def test_compile_stats_count_a_new_program_and_its_seconds():
    before = throughput.compile_stats()
    f = jax.jit(lambda x: x * 3.0 + 1.0)
    f(np.arange(7, dtype=np.float32)).block_until_ready()
    f(np.arange(7, dtype=np.float32)).block_until_ready()  # the same program: no compile
    done = throughput.compiles_since(before)
    assert done["compiles"] == 1
    assert done["compile_seconds"] >= 0


def test_position_cost_by_hand():
    """W = 2·4·8 = 64; N' = 10,000 − 10·32 (tied embeddings): 2·N' = 19,360 per position,
    plus 4·W per key scored. Rows of 256 run 4 causal blocks of 64 queries, which score
    64, 128, 192, 256 keys: 160 a query on average; rows under 128 run one block, L keys."""
    from jaxalign.models.llama import ModelConfig

    config = ModelConfig(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_embeddings=True,
        causal_blocks=4,
    )
    assert config.keys_per_query(256) == 160 and config.keys_per_query(100) == 100
    cost = throughput.position_cost(types.SimpleNamespace(config=config), 10_000)
    assert cost(256) == 19_360 + 4 * 64 * 160
    assert cost(100) == 19_360 + 4 * 64 * 100
    config = config.replace(tie_embeddings=False)  # its own output layer: not per position
    assert throughput.position_cost(types.SimpleNamespace(config=config), 10_000)(100) == (
        2 * (10_000 - 640) + 4 * 64 * 100
    )
    assert throughput.position_cost(object(), 10_000)(512) == 20_000  # no config: 2·N
