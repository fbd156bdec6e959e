"""Memory and time plan of a run, proven by compiling its programs on a simulated mesh.

Lowers and compiles, from abstract shapes only (no weights are loaded or allocated), the
programs a run of ``--config`` executes, with the run's dtypes, remat, batch and longest
sequence bucket, on a mesh of simulated CPU devices (``--xla_force_host_platform_device_count``):

- ``train_dpo``: the DPO step, reference log-probs precomputed (SPA's round 0, ``jaxalign dpo``);
- ``train_spa``: SPA's self-refinement step, the reference π_{i-1} run on the fly (rounds ≥ 1);
- ``train_dpo_lora``, ``train_spa_lora``: the same with ``spa.lora_rank`` (default for SPA
  configs that set it): LoRA adapters trained over the frozen base, π_{i-1} = base ⊕ a frozen
  copy of the previous adapters;
- ``train_ple``: PLE's LoRA step (ranking + weighted SFT rows) over the frozen base (PLE runs);
- ``judge``: one batched log-prob pass (the judge's π_init and π_{i-1}, DPO's reference);
- ``sample``: the sampler's prefill and decode loop at ``run.generate_batch_size`` prompts ×
  ``spa.samples_per_prompt`` samples, ``data.max_prompt_tokens`` + ``sampling.max_new_tokens``.
  Its weights have the training shardings (FSDP/tensor as configured), as a stage places them
  once (:func:`jaxalign.parallel.place_params`).

For each program and mesh size it reads ``compiled.memory_analysis()`` (per device:
arguments, outputs, temporaries, aliased bytes) and ``cost_analysis()`` FLOPs, and prints
whether it fits each chip's memory, with headroom. Then a time per SPA round at a stated
MFU (``--mfu``, for the train step and the judge) and, for sampling, memory-bandwidth-bound
decode (every step reads the weights a device holds and the KV cache).

The buffers are XLA:CPU's: a TPU or GPU compiler lays out and fuses differently (tiled
layouts pad small dimensions; bf16 matmuls are not upcast), so read the figures as a close
estimate, not as the accelerator's exact number, and keep ~10% headroom.

    python benchmarks/plan.py --config configs/spa_zephyr7b_ultrafeedback.yaml --arch mistral-7b
    python benchmarks/plan.py --config configs/ple_hh.yaml --arch llama2-7b --sizes 4,8

Prints a Markdown table per program and one JSON line (``--json FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

if __name__ == "__main__":  # the simulated devices must exist before JAX starts
    _devices = 8
    for i, a in enumerate(sys.argv):
        if a == "--devices" and i + 1 < len(sys.argv):
            _devices = int(sys.argv[i + 1])
        elif a.startswith("--devices="):
            _devices = int(a.split("=", 1)[1])
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign import parallel, refinement, sampling, scoring, training  # noqa: E402
from jaxalign.config import load_config  # noqa: E402
from jaxalign.models.llama import ModelConfig, Transformer  # noqa: E402

GIB = 1024**3

# Architectures by name, for configs whose model folder is not on this machine (their
# Hugging Face config.json fields).
ARCHES = {
    "mistral-7b": {  # Mistral-7B-v0.1; zephyr-7b-sft-full is this architecture
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama2-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-1b": {  # TinyLlama-1.1B's shape
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}

# name: (devices in the slice, memory per device in bytes, dense bf16 FLOP/s per device,
# memory bandwidth per device in bytes/s), from the vendors' specifications. "v4-8" and
# "v5p-8" count TensorCores: 4 chips each.
CHIPS = {
    "v4-8": (4, 32 * GIB, 275e12, 1.2e12),
    "v5e-8": (8, 16 * GIB, 197e12, 0.82e12),
    "v5p-8": (4, 95 * GIB, 459e12, 2.76e12),
    "v6e-8": (8, 32 * GIB, 918e12, 1.64e12),
    "8xA100-80GB": (8, 80e9, 312e12, 2.0e12),
    "8xH100-80GB": (8, 80e9, 989e12, 3.35e12),
}


def model_config(config, arch: str | None) -> ModelConfig:
    """The run's architecture: the model folder's config.json, else ``--arch``."""
    overrides = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    folder = pathlib.Path(config.model.name)
    if (folder / "config.json").exists():
        hf = json.loads((folder / "config.json").read_text())
    elif arch:
        hf = ARCHES[arch]
    else:
        raise SystemExit(
            f"plan.py: {config.model.name} has no config.json here; name its architecture "
            f"with --arch ({', '.join(ARCHES)})"
        )
    return ModelConfig.from_hf_config(hf, **overrides)


def abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def measured(compiled) -> dict:
    """Per-device bytes of a compiled program and its FLOPs (XLA's count, all devices)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return {
        "arguments": args,
        "outputs": out,
        "temporaries": temp,
        "aliased": alias,
        "peak": args + out + temp - alias,
        "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
    }


def batch_specs(rows: int, length: int, mesh, *, reference: bool, sft: bool = False) -> dict:
    rows_sharding = parallel.batch_sharding(mesh)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows_sharding)

    out = {}
    for side in ("chosen", "rejected") + (("sft",) if sft else ()):
        out[f"{side}_ids"] = spec((rows, length), jnp.int32)
        out[f"{side}_attention_mask"] = spec((rows, length), jnp.int32)
        out[f"{side}_loss_mask"] = spec((rows, length), jnp.int32)
    out["weight"] = spec((rows,), jnp.float32)
    out["smoothing"] = spec((rows,), jnp.float32)
    if sft:
        out["sft_weight"] = spec((rows,), jnp.float32)
    if reference:
        out["ref_chosen_logps"] = spec((rows,), jnp.float32)
        out["ref_rejected_logps"] = spec((rows,), jnp.float32)
    return out


def plan_programs(config, cfg: ModelConfig, devices: int, programs: list[str]) -> dict:
    """Compiles ``programs`` on a ``devices``-device mesh; ``{program: measured}``."""
    mesh_cfg = config.run.mesh
    fsdp = devices if mesh_cfg.fsdp == -1 else mesh_cfg.fsdp
    tensor = mesh_cfg.tensor
    data = max(devices // (fsdp * tensor), 1) if mesh_cfg.data == -1 else mesh_cfg.data
    mesh = parallel.make_mesh(data, fsdp, tensor, devices=jax.devices()[:devices])
    train = config.train
    rows = train.batch_size
    length = config.data.max_prompt_tokens + config.data.max_response_tokens
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(training.configure_model(model, train))
    param_shardings = parallel.model_shardings(params, mesh)
    out = {}

    def train_step(name, loss_fn, *, reference, algo_state=None, frozen=None, trained=None):
        trained = params if trained is None else trained
        trained_graphdef = graphdef if trained is params else trained[0]
        trained_params = trained if trained is params else trained[1]
        shardings_p = parallel.model_shardings(trained_params, mesh)
        optimizer = training.make_optimizer(train, 1000)

        def init(p, a):
            return training.TrainState(
                step=jnp.zeros((), jnp.int32),
                params=p,
                opt_state=optimizer.init(p),
                rng=jax.random.PRNGKey(0),
                algo_state=a,
                skipped_steps=jnp.zeros((), jnp.int32),
            )

        a = {} if algo_state is None else algo_state
        state = jax.eval_shape(init, trained_params, a)
        shardings = training.state_shardings_for(state, shardings_p, optimizer, mesh)
        frozen_shardings = None if frozen is None else parallel.model_shardings(frozen, mesh)
        step = training.make_train_step(
            trained_graphdef,
            train,
            mesh,
            loss_fn,
            shardings,
            total_steps=1000,
            frozen_shardings=frozen_shardings,
        )
        args = [abstract(state, shardings), batch_specs(rows, length, mesh, reference=reference)]
        if name == "train_ple":
            args[1] = batch_specs(rows, length, mesh, reference=False, sft=True)
        if frozen is not None:
            args.append(abstract(frozen, frozen_shardings))
        t = time.perf_counter()
        compiled = step.lower(*args).compile()
        out[name] = {**measured(compiled), "compile_s": round(time.perf_counter() - t, 1)}

    if "train_dpo" in programs:
        train_step("train_dpo", training.dpo_loss_fn(train), reference=True)
    spa = config.spa
    buffer = jax.eval_shape(lambda: refinement.init_margin_buffer(spa.margin_window))

    def spa_loss(reference_graphdef):
        """SPA's round-1 refinement loss (``None``: the reference comes as a model)."""
        return refinement.spa_loss_fn(
            reference_graphdef,
            beta=train.beta,
            lam=spa.lambda_for_round(1),
            quantile=spa.noise_quantile,
            alpha=spa.smoothing_alpha,
            flag_after_step=0,
            label_mode=spa.label_mode,
            chunk_size=train.logp_chunk_size,
        )

    if "train_spa" in programs:
        loss = spa_loss(graphdef)
        train_step("train_spa", loss, reference=False, algo_state=buffer, frozen=params)
    if "train_dpo_lora" in programs or "train_spa_lora" in programs:
        from jaxalign.models import lora

        rank = spa.lora_rank or 16
        base = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        adapters = nnx.split(
            nnx.eval_shape(
                lambda: lora.LoraAdapters(
                    Transformer(cfg, rngs=nnx.Rngs(0)),
                    rank=rank,
                    targets=spa.lora_targets,
                    rngs=nnx.Rngs(0),
                )
            )
        )
        base_graphdef, base_params = nnx.split(training.configure_model(base, train))
        plain = dataclasses.replace(train, compute_dtype=None, remat=None)
        scaling = lora.lora_scaling(rank, spa.lora_alpha)
        if "train_dpo_lora" in programs:
            loss = lora.lora_loss_fn(base_graphdef, training.dpo_loss_fn(plain), scaling)
            train_step("train_dpo_lora", loss, reference=True, frozen=base_params, trained=adapters)
        if "train_spa_lora" in programs:
            loss = lora.lora_loss_fn(base_graphdef, spa_loss(None), scaling, reference=True)
            frozen = {"base": base_params, "reference": adapters[1]}
            train_step(
                "train_spa_lora",
                loss,
                reference=False,
                algo_state=buffer,
                frozen=frozen,
                trained=adapters,
            )
    if "train_ple" in programs:
        from jaxalign import enhancement
        from jaxalign.models import lora

        p = config.ple
        base = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        adapters = nnx.eval_shape(
            lambda: lora.LoraAdapters(
                Transformer(cfg, rngs=nnx.Rngs(0)),
                rank=p.lora_rank,
                targets=p.lora_targets,
                rngs=nnx.Rngs(0),
            )
        )
        base_graphdef, base_params = nnx.split(training.configure_model(base, train))
        plain = dataclasses.replace(train, compute_dtype=None, remat=None)
        loss = lora.lora_loss_fn(
            base_graphdef,
            enhancement.ple_loss_fn(plain, p.sft_coefficient),
            lora.lora_scaling(p.lora_rank, p.lora_alpha),
        )
        train_step(
            "train_ple", loss, reference=False, frozen=base_params, trained=nnx.split(adapters)
        )
    if "judge" in programs:
        rows_sharding = parallel.batch_sharding(mesh)
        spec = jax.ShapeDtypeStruct((2 * rows, length), jnp.int32, sharding=rows_sharding)
        t = time.perf_counter()
        compiled = scoring._sequence_logps.lower(
            graphdef,
            abstract(params, param_shardings),
            spec,
            spec,
            spec,
            chunk_size=train.logp_chunk_size,
        ).compile()
        out["judge"] = {**measured(compiled), "compile_s": round(time.perf_counter() - t, 1)}
    if "sample" in programs:
        n = config.spa.samples_per_prompt if config.run.algorithm == "spa" else 1
        prompts = config.run.generate_batch_size
        prompts = -(-prompts // parallel.batch_divisor(mesh)) * parallel.batch_divisor(mesh)
        sconfig = sampling.SamplingConfig(
            n=n,
            max_new_tokens=config.sampling.max_new_tokens,
            temperature=config.sampling.temperature,
            top_p=config.sampling.top_p,
            eos_token_ids=(2,),
            return_logprobs=True,
        )
        sample_graphdef, sample_params = nnx.split(model)
        replicated = parallel.replicated(mesh)
        rows_sharding = parallel.batch_sharding(mesh)
        p_len = config.data.max_prompt_tokens
        ids = jax.ShapeDtypeStruct((prompts, p_len), jnp.int32, sharding=rows_sharding)
        mask = jax.ShapeDtypeStruct((prompts, p_len), jnp.bool_, sharding=rows_sharding)
        key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), prompts))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
        state = abstract(sample_params, parallel.model_shardings(sample_params, mesh))
        t = time.perf_counter()
        compiled = (
            sampling._compiled(sample_graphdef, sconfig).lower(state, ids, mask, key).compile()
        )
        out["sample"] = {
            **measured(compiled),
            "compile_s": round(time.perf_counter() - t, 1),
            "rows": prompts * n,
        }
    return out


def round_seconds(config, cfg: ModelConfig, chip: str, plan: dict, mfu: float) -> dict | None:
    """Estimated seconds of one SPA round of ``spa.prompts_per_round[-1]`` prompts."""
    if config.run.algorithm != "spa" or not config.spa.prompts_per_round:
        return None
    devices, _, peak, bandwidth = CHIPS[chip]
    prompts = config.spa.prompts_per_round[-1]
    n = config.spa.samples_per_prompt
    tokens = config.data.max_prompt_tokens + config.data.max_response_tokens
    n_params = (
        cfg.num_layers
        * (
            cfg.hidden_size * cfg.dim_per_head * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
            + 3 * cfg.hidden_size * cfg.intermediate_size
        )
        + 2 * cfg.vocab_size * cfg.hidden_size
    )
    slice_peak = peak * devices * mfu
    # Training: policy forward + backward and the on-the-fly reference (6N + 2N per token);
    # with LoRA the backward pass needs no weight gradients of the base (4N + 2N).
    per_token = 6 if config.spa.lora else 8
    train_s = per_token * n_params * prompts * tokens * config.spa.round_epochs / slice_peak
    # The judge: two forward passes (π_init, π_{i-1}) over every sample.
    judge_s = 2 * 2 * n_params * prompts * n * tokens / slice_peak
    # Decode: every step reads the whole model on every device (FSDP gathers the shards
    # it does not hold) and its share of the KV cache.
    sample = plan.get("sample")
    steps = config.sampling.max_new_tokens
    batches = -(-prompts // config.run.generate_batch_size)
    weight_bytes = n_params * jnp.dtype(cfg.param_dtype).itemsize
    rows = config.run.generate_batch_size * n / devices  # rows split over the devices
    positions = config.data.max_prompt_tokens + steps
    cache_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.dim_per_head * positions * rows
    cache_bytes *= jnp.dtype(cfg.dtype).itemsize
    per_step = (weight_bytes + cache_bytes) / bandwidth if sample else 0
    sample_s = batches * steps * per_step
    return {
        "sample_s": round(sample_s),
        "judge_s": round(judge_s),
        "train_s": round(train_s),
        "total_s": round(sample_s + judge_s + train_s),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--arch", choices=sorted(ARCHES), help="architecture, if not on disk")
    parser.add_argument("--devices", type=int, default=8, help="simulated devices")
    parser.add_argument("--sizes", default="4,8", help="mesh sizes to compile for")
    parser.add_argument("--programs", default="", help="comma list (default: the run's)")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the times")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    cfg = model_config(config, args.arch)
    if args.programs:
        programs = args.programs.split(",")
    elif config.run.algorithm == "ple":
        programs = ["train_ple", "judge", "sample"]
    elif config.spa.lora:
        programs = ["train_dpo_lora", "train_spa_lora", "judge", "sample"]
    else:
        programs = ["train_dpo", "train_spa", "judge", "sample"]
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > len(jax.devices()):
        raise SystemExit(f"plan.py: --sizes {args.sizes} needs --devices {max(sizes)}")
    plans = {size: plan_programs(config, cfg, size, programs) for size in sizes}
    result = {
        "benchmark": "plan",
        "config": args.config,
        "model": {
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "param_dtype": cfg.param_dtype,
            "dtype": cfg.dtype,
        },
        "batch": config.train.batch_size,
        "sequence": config.data.max_prompt_tokens + config.data.max_response_tokens,
        "plans": {str(k): v for k, v in plans.items()},
        "fits": {},
        "round_seconds": {},
    }
    print(f"# Plan for {args.config}\n")
    for chip, (devices, memory, _, _) in CHIPS.items():
        plan = plans.get(devices)
        if plan is None:
            continue
        fits = {name: m["peak"] <= memory for name, m in plan.items()}
        result["fits"][chip] = fits
        result["round_seconds"][chip] = round_seconds(config, cfg, chip, plan, args.mfu)
    lines = [
        "| program | devices | arguments GiB | temporaries GiB | peak GiB / device | "
        + " | ".join(chip for chip in CHIPS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(CHIPS),
    ]
    for size, plan in plans.items():
        for name, m in plan.items():
            cells = []
            for devices, memory, _, _ in CHIPS.values():
                if devices != size:
                    cells.append("")
                else:
                    head = (memory - m["peak"]) / memory
                    cells.append(f"{'fits' if head >= 0 else 'no'} ({head:+.0%})")
            lines.append(
                f"| {name} | {size} | {m['arguments'] / GIB:.1f} | {m['temporaries'] / GIB:.1f} | "
                f"{m['peak'] / GIB:.1f} | " + " | ".join(cells) + " |"
            )
    print("\n".join(lines))
    times = {k: v for k, v in result["round_seconds"].items() if v}
    if times:
        print(f"\nOne round of {config.spa.prompts_per_round[-1]} prompts at MFU {args.mfu}:\n")
        print("| slice | sample s | judge s | train s | total h |\n|---|---|---|---|---|")
        for chip, t in times.items():
            print(
                f"| {chip} | {t['sample_s']} | {t['judge_s']} | {t['train_s']} | "
                f"{t['total_s'] / 3600:.1f} |"
            )
    line = json.dumps(result)
    print(line)
    if args.json:
        pathlib.Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
