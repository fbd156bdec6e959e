"""A miniature SPA run written with jaxalign's public functions: no CLI, no round loop.

    python examples/spa_functional.py                      # SmolLM2-135M-Instruct
    python examples/spa_functional.py --model PATH --steps 2

Each step is one call you can swap: the sampler's settings, the judge (any function
from responses to scores), the loss (any ``loss_fn`` for ``make_train_step``).
"""

import argparse

import jax
from flax import nnx

from jaxalign import judging, loop, refinement, training
from jaxalign.config import load_config
from jaxalign.data.pairs import build_pair_batches
from jaxalign.data.records import read_preference_records, read_prompt_records
from jaxalign.generation import sample_texts
from jaxalign.models import load
from jaxalign.parallel import make_mesh, model_shardings
from jaxalign.sampling import SamplingConfig
from jaxalign.scoring import response_logps, with_reference_logps


def train_steps(model, batches, config, mesh, loss_fn, steps, algo_state=None, frozen=None):
    """``steps`` train steps over ``batches``; returns the new parameters and last metrics."""
    graphdef, state, shardings = training.create_train_state(
        model, config, steps, mesh, algo_state=algo_state
    )
    frozen_shardings = None if frozen is None else model_shardings(frozen, mesh)
    step_fn = training.make_train_step(
        graphdef,
        config,
        mesh,
        loss_fn,
        shardings,
        total_steps=steps,
        frozen_shardings=frozen_shardings,
    )
    for i in range(steps):
        batch = loop.device_batch(batches[i % len(batches)], mesh)  # the train-step fields
        args = () if frozen is None else (jax.device_put(frozen, frozen_shardings),)
        state, metrics = step_fn(state, batch, *args)
        print(f"  step {i + 1}: loss {float(metrics['train/loss']):.4f}")
    return state.params, metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seed-pairs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)  # π_init
    graphdef, init_params = nnx.split(model)
    mesh = make_mesh()
    config = load_config(
        None,
        [
            f"train.learning_rate={args.learning_rate}",
            "train.batch_size=8",
            "data.max_prompt_tokens=64",
            f"data.max_response_tokens={args.max_new_tokens}",
        ],
    )

    def batches_of(records):
        batches, _ = build_pair_batches(
            records,
            tokenizer,
            batch_size=config.train.batch_size,
            max_prompt_tokens=config.data.max_prompt_tokens,
            max_response_tokens=config.data.max_response_tokens,
        )
        return batches

    # Round 0: DPO on seed pairs, reference log-probs precomputed under π_init.
    print("round 0: DPO on seed pairs")
    seed, _ = read_preference_records("demo")
    seed_batches = with_reference_logps(
        graphdef, init_params, batches_of(seed[: args.seed_pairs]), config.train
    )
    policy_params, _ = train_steps(
        model, seed_batches, config.train, mesh, training.dpo_loss_fn(config.train), args.steps
    )
    policy = nnx.merge(graphdef, policy_params)

    # Round 1, sample: two responses per prompt from π_0.
    prompts, _ = read_prompt_records("demo")
    prompts = prompts[: args.prompts]
    sampling = SamplingConfig(
        n=2,
        temperature=0.7,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        eos_token_ids=tokenizer.eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    completions = sample_texts(
        policy,
        tokenizer,
        [p["prompt"] for p in prompts],
        sampling,
        seed=0,
        batch_size=4,
        progress=False,
    )

    # Round 1, judge: implicit reward β·(log π_0 − log π_init), by forward passes.
    candidates = [[judging.Candidate(c.text, c.finished) for c in group] for group in completions]
    scored = [
        {
            "prompt": p["prompt"],
            "chosen": c[0].text or " ",
            "rejected": c[1].text or " ",
            "chosen_eos": c[0].finished,
            "rejected_eos": c[1].finished,
        }
        for p, c in zip(prompts, candidates, strict=True)
    ]
    rewards = judging.implicit_reward(
        response_logps(graphdef, policy_params, scored, tokenizer, config),
        response_logps(graphdef, init_params, scored, tokenizer, config),
        config.train.beta,
    )
    pairs, counts = judging.make_pairs(
        [p["id"] for p in prompts], [p["prompt"] for p in prompts], candidates, rewards.tolist()
    )
    print(f"round 1: judged {counts.considered} prompts, kept {counts.kept} pairs")
    if not pairs:
        print("no usable pairs this time (all identical, empty or tied); try more prompts")
        return None

    # Round 1, train: SPA's self-refining loss; reference π_0 runs on the fly.
    loss_fn = refinement.spa_loss_fn(
        graphdef, beta=config.train.beta, lam=0.5, quantile=0.1, alpha=0.1, flag_after_step=0
    )
    params, metrics = train_steps(
        policy,
        batches_of([p.to_record() for p in pairs]),
        config.train,
        mesh,
        loss_fn,
        args.steps,
        algo_state=refinement.init_margin_buffer(64),
        frozen=policy_params,
    )
    print(f"round 1: flagged fraction {float(metrics['spa/flagged_fraction']):.2f}")
    return params


if __name__ == "__main__":
    main()
