"""Tokenisation for prompts and responses, over a transformers fast tokenizer.

A ``Tokenizer`` comes from a Hugging Face folder or from the vocabulary, merges and
chat template stored in a GGUF file's metadata. It fixes the conventions the rest of
jaxalign relies on:

* ``encode`` never adds special tokens; ``encode_prompt`` adds exactly what the model
  expects: the chat template's own tokens (BOS included when the template has it), or
  a single BOS for plain text when the tokenizer normally adds one.
* ``encode_response`` ends a response with the end-of-turn token, so a trained model
  learns to stop.
* ``eos_token_ids`` lists every token that ends generation (the tokenizer's EOS plus
  chat end-of-turn markers such as ``<|im_end|>`` or ``<|eot_id|>``).
* Truncation goes through ``truncate_left``, which reports whether it cut anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Special tokens that end a turn or a document in common chat formats.
END_MARKERS = (
    "<|im_end|>",  # ChatML: SmolLM2, Qwen2
    "<|eot_id|>",  # Llama 3
    "<|end_of_text|>",  # Llama 3 base
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)


def truncate_left(ids: Sequence[int], max_len: int) -> tuple[list[int], bool]:
    """Keeps the last ``max_len`` ids; returns ``(ids, truncated)`` so callers can count cuts."""
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    ids = list(ids)
    if len(ids) <= max_len:
        return ids, False
    return ids[len(ids) - max_len :], True


class Tokenizer:
    """A transformers fast tokenizer with jaxalign's prompt/response conventions."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        bos = self.hf.bos_token_id
        probe = self.hf.encode("a", add_special_tokens=True)
        self._plain_text_bos = bos is not None and len(probe) > 0 and probe[0] == bos

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Loads the tokenizer files of a local Hugging Face folder (no network)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such tokenizer folder")
        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{folder}: cannot load a tokenizer ({e}); the folder needs tokenizer.json "
                "(or the files save_pretrained writes)"
            ) from None
        return cls(hf)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Builds the tokenizer from a GGUF file's ``tokenizer.*`` metadata (no network).

        A byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2`` with GPT-2's split
        rule: SmolLM2's, GPT-2's) is built here from the metadata, without torch. Any other
        goes through transformers' GGUF reader, which imports torch in transformers ≥ 5.24.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        hf = byte_level_bpe_from_gguf(path)
        if hf is not None:
            return cls(hf)
        try:
            hf = AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: cannot build a tokenizer from its metadata ({e})") from None
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"{path}: transformers needs torch to read this GGUF's tokenizer "
                f"({e}); pip install torch, or load a Hugging Face folder instead"
            ) from None
        return cls(hf)

    def _special_ids(self) -> dict[str, int]:
        """Added (special) token text -> id."""
        return {str(token): i for i, token in self.hf.added_tokens_decoder.items()}

    # -- properties -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS first, then end-of-turn/document markers."""
        ids = [] if self.hf.eos_token_id is None else [self.hf.eos_token_id]
        special = self._special_ids()
        ids += [special[marker] for marker in END_MARKERS if marker in special]
        return tuple(dict.fromkeys(ids))

    @property
    def end_of_turn_id(self) -> int:
        """The id that closes an assistant turn: the template's end marker, else EOS."""
        template = self.hf.chat_template or ""
        special = self._special_ids()
        for marker in END_MARKERS:
            if marker in special and marker in template:
                return special[marker]
        if self.hf.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set eos_token in its config")
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The padding id (EOS when the tokenizer defines none; padding is masked anyway)."""
        if self.hf.pad_token_id is not None:
            return self.hf.pad_token_id
        if self.hf.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        return self.hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    # -- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS/EOS unless ``add_special_tokens``."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat-formatted text of ``messages`` (``[{"role", "content"}, ...]``)."""
        if not self.has_chat_template:
            raise ValueError(
                "this tokenizer has no chat template; pass use_chat_template=False (plain text "
                "prompts) or use a tokenizer whose config defines chat_template"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(
                    f"message {i} must be a dict with 'role' and 'content': {message!r}"
                )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_prompt(self, prompt: str | list[dict], use_chat_template: bool = True) -> list[int]:
        """Ids of a prompt, ready for the model to continue.

        A string becomes one user message when ``use_chat_template``. The template's
        text already holds its special tokens, so nothing more is added, and a doubled
        BOS (template BOS + tokenizer BOS) cannot occur. Without a template the text
        gets one BOS if the tokenizer normally adds one.
        """
        if use_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = self.encode(self.apply_chat_template(messages, add_generation_prompt=True))
        else:
            if not isinstance(prompt, str):
                raise ValueError("a list of messages needs use_chat_template=True")
            ids = self.encode(prompt)
            if self._plain_text_bos and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id, *ids]
        return ids

    def encode_response(self, text: str, add_eos: bool = True) -> list[int]:
        """Ids of a response continuing a prompt, ended by ``end_of_turn_id``."""
        ids = self.encode(text)
        return [*ids, self.end_of_turn_id] if add_eos else ids

    def save_pretrained(self, path: str | Path) -> None:
        """Writes the tokenizer files (``tokenizer.json``, config, chat template)."""
        self.hf.save_pretrained(str(path))


# llama.cpp's token types (``tokenizer.ggml.token_type``).
_CONTROL, _USER_DEFINED = 3, 4
# ``tokenizer.ggml.pre`` values whose split rule is GPT-2's own (the byte-level default).
_GPT2_SPLIT_PRE = (None, "default", "gpt2", "smollm")


def byte_level_bpe_from_gguf(path: str | Path):
    """A transformers fast tokenizer for a GGUF whose metadata describes byte-level BPE with
    GPT-2's split rule, built from the vocabulary, merges, token types, special ids and chat
    template alone (the tokenizer transformers' GGUF reader builds for such a file, without
    its torch import); ``None`` for any other kind of vocabulary."""
    import gguf
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key: str, default=None):
        found = reader.fields.get(f"tokenizer.{key}")
        return default if found is None else found.contents()

    if field("ggml.model") != "gpt2" or field("ggml.pre") not in _GPT2_SPLIT_PRE:
        return None
    tokens = [str(t) for t in field("ggml.tokens", [])]
    merges = [tuple(str(m).split(" ")) for m in field("ggml.merges", [])]
    if not tokens or not merges:
        raise ValueError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is empty")
    # A token spelled in plain text rather than the byte alphabet is respelled into it.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelling = _byte_alphabet()
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    backend = Backend(
        models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="")
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    kinds = [int(k) for k in field("ggml.token_type", [])]
    # Control tokens stay whole and special; one spelled outside the byte alphabet is a
    # mislabel in the file (as transformers' reader also skips it).
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, kinds, strict=False)
            if kind == _CONTROL and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, kinds, strict=False)
            if k == _USER_DEFINED and set(t) <= alphabet
        ]
    )

    def token(key: str) -> str | None:
        i = field(f"ggml.{key}")
        return None if i is None else tokens[int(i)]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=field("chat_template"),
        add_bos_token=bool(field("ggml.add_bos_token", False)),
        add_eos_token=bool(field("ggml.add_eos_token", False)),
    )


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    return {**chars, **{b: chr(256 + n) for n, b in enumerate(extra)}}
