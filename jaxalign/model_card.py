"""The model card (``README.md``) of an exported model, as the Hugging Face Hub reads it.

A card is YAML front matter — the Hub's metadata: ``base_model`` (the Hub name of the model
training started from, where it has one), ``library_name``, ``license``, ``datasets``
(Hub names only), ``tags``, ``pipeline_tag`` — and a Markdown body: what the model is
and which method and paper trained it; how to load it with transformers, serve it with
vLLM, or convert it for llama.cpp; the data counts and rounds; the run's summary table
when the run evaluated itself; the config that trained it; the versions; a citation.

:func:`render` is text only: the facts come in a :class:`CardFacts`, which the export
stage (:mod:`jaxalign.algorithms.stages`) gathers from the run's config and state.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any

import yaml

from jaxalign.report import format_table


@dataclasses.dataclass(frozen=True)
class Method:
    """An alignment method as a card names and cites it."""

    tag: str
    name: str
    paper: str
    arxiv: str
    venue: str
    bibtex: str

    @property
    def link(self) -> str:
        return f"[{self.paper}](https://arxiv.org/abs/{self.arxiv})"


METHODS = {
    "spa": Method(
        tag="spa",
        name="SPA (Spread Preference Annotation)",
        paper="Aligning Large Language Models with Self-generated Preference Data",
        arxiv="2406.04412",
        venue="ICLR 2025",
        bibtex="""@inproceedings{kim2025spa,
    title     = {Aligning Large Language Models with Self-generated Preference Data},
    author    = {Dongyoung Kim and Kimin Lee and Jinwoo Shin and Jaehyung Kim},
    booktitle = {International Conference on Learning Representations},
    year      = {2025},
    eprint    = {2406.04412},
    archivePrefix = {arXiv}
}""",
    ),
    "ple": Method(
        tag="ple",
        name="PLE (Progressively Label Enhancement)",
        paper="Progressively Label Enhancement for Large Language Model Alignment",
        arxiv="2408.02599",
        venue="ICML 2025",
        bibtex="""@inproceedings{liu2025ple,
    title     = {Progressively Label Enhancement for Large Language Model Alignment},
    author    = {Biao Liu and Ning Xu and Xin Geng},
    booktitle = {International Conference on Machine Learning},
    year      = {2025},
    eprint    = {2408.02599},
    archivePrefix = {arXiv}
}""",
    ),
    "dpo": Method(
        tag="dpo",
        name="DPO (Direct Preference Optimization)",
        paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        arxiv="2305.18290",
        venue="NeurIPS 2023",
        bibtex="""@inproceedings{rafailov2023dpo,
    title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
    author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning
                 and Stefano Ermon and Chelsea Finn},
    booktitle = {Advances in Neural Information Processing Systems},
    year      = {2023},
    eprint    = {2305.18290},
    archivePrefix = {arXiv}
}""",
    ),
}


@dataclasses.dataclass(frozen=True)
class CardFacts:
    """Everything a card states about one exported model."""

    algorithm: str  # spa | ple | dpo
    name: str  # the card's title, e.g. "spa_demo round 2"
    base_model: str  # what the run's model.name says (a registered name, path or Hub name)
    base_hub_id: str | None  # its Hub name, when it has one (front matter base_model)
    license: str | None  # inherited from the base model, when known
    round_index: int | None  # None: DPO, which has no rounds
    rounds_finished: tuple[int, ...] | None  # the run's rounds that had finished training
    rounds_planned: int | None  # spa.rounds + 1 (round 0 included) or ple.iterations
    config: dict[str, Any]  # the run's config, as in its config.yaml
    data_rows: list[dict[str, Any]]  # data counts, one row per round
    data_columns: list[tuple[str, str]]  # (key, header) of data_rows
    summary_table: str | None = None  # the run's summary.md table, when it evaluated
    datasets: tuple[str, ...] = ()  # Hub names of the data, when the data are Hub datasets
    dtype: str = "float32"  # of the exported tensors


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """The card's metadata, in the Hub's field names."""
    method = METHODS[facts.algorithm]
    data: dict[str, Any] = {}
    if facts.base_hub_id:
        data["base_model"] = facts.base_hub_id
    data["library_name"] = "jaxalign"
    if facts.license:
        data["license"] = facts.license
    if facts.datasets:
        data["datasets"] = list(facts.datasets)
    data["model_name"] = facts.name
    data["tags"] = ["jaxalign", method.tag, "alignment", "preference-optimization", "jax"]
    data["pipeline_tag"] = "text-generation"
    return data


def _round_sentence(facts: CardFacts) -> str:
    method = METHODS[facts.algorithm]
    base = f"[{facts.base_hub_id}](https://huggingface.co/{facts.base_hub_id})"
    base = base if facts.base_hub_id else f"`{facts.base_model}`"
    where = ""
    if facts.algorithm == "spa" and facts.round_index is not None:
        where = (
            f" It is the model after round {facts.round_index}"
            + (
                " (DPO on the seed pairs)"
                if facts.round_index == 0
                else " (self-annotated preference data with self-refinement)"
            )
            + (
                f" of a run planned for rounds 0–{facts.rounds_planned - 1}"
                if facts.rounds_planned
                else ""
            )
            + "."
        )
    elif facts.algorithm == "ple" and facts.round_index is not None:
        where = (
            f" It is the model after iteration {facts.round_index}"
            + (
                f" of a run planned for iterations 0–{facts.rounds_planned - 1}"
                if facts.rounds_planned
                else ""
            )
            + ", its LoRA adapters merged into the base weights."
        )
    return (
        f"This model is {base} aligned with {method.name}, the method of {method.link} "
        f"({method.venue}), trained with jaxalign, a JAX / Flax NNX implementation of SPA "
        f"and PLE.{where}"
    )


def _usage(folder: str) -> str:
    return f"""## How to use it

The folder is an ordinary Hugging Face model (`config.json`, `model.safetensors`,
tokenizer files with the chat template, `generation_config.json`). Replace `{folder}`
with where the folder is, or with its Hub name once uploaded.

### transformers

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = "{folder}"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs, max_new_tokens=128, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

### vLLM

```bash
vllm serve {folder}        # an OpenAI-compatible server on port 8000
```

```python
from vllm import LLM, SamplingParams

llm = LLM(model="{folder}")
outputs = llm.chat([{{"role": "user", "content": "What is the capital of France?"}}],
                   SamplingParams(temperature=0.0, max_tokens=128))
print(outputs[0].outputs[0].text)
```

### llama.cpp

Convert the folder with llama.cpp's own converter (from a clone of
<https://github.com/ggml-org/llama.cpp>, after `pip install -r requirements.txt` there),
quantise if you like, then chat with it:

```bash
python llama.cpp/convert_hf_to_gguf.py {folder} --outfile model-f16.gguf --outtype f16
llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M      # optional
llama-cli -m model-q4_k_m.gguf -cnv                         # or: llama-server -m ...
```"""


def _training(facts: CardFacts) -> str:
    cfg = facts.config
    train = cfg.get("train", {})
    lines = ["## Training procedure", ""]
    if facts.algorithm == "spa":
        spa = cfg.get("spa", {})
        lines += [
            "Round 0 is DPO on a small set of human-labelled seed pairs, the reference being",
            "the starting model. Each round i ≥ 1 samples "
            f"{spa.get('samples_per_prompt', 2)} responses per new prompt from the previous",
            "round's model, labels the pair with the model's own implicit reward",
            f"`β·(log π(y|x) − log π_init(y|x))` (β = {train.get('beta')}), and trains on the",
            "pairs with DPO plus self-refinement: de-coupled noise detection from extrapolated",
            f"logits, and label smoothing α = {spa.get('smoothing_alpha')} for the pairs it flags.",
        ]
        if spa.get("lora_rank", 0) > 0:
            lines += [
                f"Every round trains LoRA adapters (r = {spa.get('lora_rank')}, "
                f"α = {spa.get('lora_alpha')}) on the frozen starting model, continuing the",
                "previous round's; the exported weights have them merged in (`W + s·A@B`).",
            ]
    elif facts.algorithm == "ple":
        ple = cfg.get("ple", {})
        lines += [
            "Each iteration samples a plain and a principle-guided response per query, scores",
            f"both with a reward judge (`{ple.get('reward')}`), and trains LoRA adapters",
            f"(r = {ple.get('lora_rank')}, α = {ple.get('lora_alpha')}) with a ranking loss",
            f"where the reward gap exceeds τ_t = τ0·α^t (τ0 = {ple.get('tau0')}, "
            f"α = {ple.get('decay')})",
            "and reward-weighted SFT where it does not. The exported weights are the base",
            "weights with the adapters merged in (`W + s·A@B`).",
        ]
    else:
        lines += [
            "DPO on a preference file, the reference being the starting model, for "
            f"{train.get('epochs')} epoch(s) (β = {train.get('beta')}, loss "
            f"`{train.get('loss', 'sigmoid')}`).",
        ]
        dpo = cfg.get("dpo", {})
        if dpo.get("lora_rank", 0) > 0:
            lines += [
                f"It trains LoRA adapters (r = {dpo.get('lora_rank')}, α = "
                f"{dpo.get('lora_alpha')}) on the frozen starting model; the exported weights",
                "have them merged in (`W + s·A@B`).",
            ]
    lines += [
        "",
        f"Optimiser: AdamW, learning rate {train.get('learning_rate')}, batch "
        f"{train.get('batch_size')}. Exported tensors: {facts.dtype}.",
    ]
    if facts.rounds_finished:
        word = "Iterations" if facts.algorithm == "ple" else "Rounds"
        done = ", ".join(map(str, facts.rounds_finished))
        lines += ["", f"{word} of the run that had finished training at export: {done}."]
    if facts.data_rows:
        lines += ["", "### Data", "", format_table(facts.data_rows, facts.data_columns)]
        data = cfg.get("data", {})
        sources = [
            f"{label}: `{data[key]}`"
            for key, label in (
                ("seed_pairs", "seed pairs"),
                ("prompts", "prompts"),
                ("eval_prompts", "evaluation prompts"),
            )
            if key in data and (facts.algorithm != "ple" or key != "seed_pairs")
        ]
        if sources:
            lines += [
                "",
                "Sources (`demo`: the data shipped with jaxalign): " + "; ".join(sources) + ".",
            ]
    return "\n".join(lines)


def _evaluation(facts: CardFacts) -> str:
    if not facts.summary_table:
        return ""
    judge = facts.config.get("eval", {}).get("judge")
    return "\n".join(
        [
            "## Evaluation",
            "",
            "The run's own summary (its `summary.md`): after every round, greedy answers to the",
            f"held-out evaluation prompts, scored by the gold judge `{judge}` against the",
            "starting model's answers (win rate with ties counted ½ and its 95% interval).",
            "",
            facts.summary_table.strip(),
        ]
    )


def _versions() -> str:
    lines = ["### Framework versions", ""]
    for package in ("jaxalign", "jax", "flax", "optax", "transformers"):
        try:
            lines.append(f"- {package}: {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines)


def render(facts: CardFacts, folder: str = "path/to/this/folder") -> str:
    """The ``README.md`` text of an exported model; ``folder`` is where its usage
    examples point."""
    if facts.algorithm not in METHODS:
        raise ValueError(
            f"no model card for algorithm {facts.algorithm!r}; known: {sorted(METHODS)}"
        )
    method = METHODS[facts.algorithm]
    head = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    config = yaml.safe_dump(facts.config, sort_keys=False, allow_unicode=True)
    parts = [
        f"---\n{head}---",
        f"# {facts.name}",
        _round_sentence(facts),
        _usage(folder),
        _training(facts),
        _evaluation(facts),
        "### Config\n\nThe run's `config.yaml`; `jaxalign "
        f"{'dpo' if facts.algorithm == 'dpo' else 'run'} --config config.yaml` repeats the "
        f"run.\n\n```yaml\n{config}```",
        _versions(),
        f"## Citation\n\n{method.name}:\n\n```bibtex\n{method.bibtex}\n```",
    ]
    return "\n\n".join(p for p in parts if p) + "\n"
