"""A one-layer random model, a character tokenizer and small pair batches, for tests of the
training loop, the scoring passes and DPO that need no real model or tokenizer."""

from jaxalign.data.pairs import build_pair_batches
from jaxalign.models.llama import ModelConfig

TINY = ModelConfig(
    vocab_size=128, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
)


class CharTokenizer:
    pad_token_id = 0

    def encode_prompt(self, prompt, use_chat_template=True):
        return [1] + [ord(c) % 128 for c in prompt]

    def encode_response(self, text, add_eos=True):
        return [ord(c) % 128 for c in text] + ([2] if add_eos else [])


def tiny_batches(n: int = 8, batch_size: int = 4):
    """``n`` pairs ("question i?", "yes " × (i % 3 + 1) over "no") in batches of ``batch_size``."""
    records = [
        {"prompt": f"question {i}?", "chosen": "yes " * (i % 3 + 1), "rejected": "no"}
        for i in range(n)
    ]
    batches, _ = build_pair_batches(
        records,
        CharTokenizer(),
        batch_size=batch_size,
        max_prompt_tokens=16,
        max_response_tokens=16,
    )
    return batches
