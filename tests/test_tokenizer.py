"""Tokenizer parity with transformers' tokenizer built from the same GGUF file."""

import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from jaxalign.loading import EMBEDDED, installed_gguf
from jaxalign.tokenizer import Tokenizer, truncate_left

SMOLLM2 = EMBEDDED["smollm2-135m-instruct"]

TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs of    spaces\t\ttabs",
    "line one\nline two\n\n\nthree blank\r\nwindows line",
    "Numbers: 0 7 42 2024 3.14159 -17 1e-5 1,000,000",
    "Ünïcödé: café naïve façade Ångström",
    "CJK: 東京は日本の首都です。 北京欢迎你 서울",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦 🇫🇷 ✨",
    "Code:\ndef f(x):\n    return {'a': [x**2 for x in range(10)]}  # comment\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
    " ",
    "Ελληνικά και русский текст, עברית, العربية",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one, in 日本語?"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    path = installed_gguf(SMOLLM2)
    if path is None:
        pytest.skip(f"needs the embedded model package: {SMOLLM2.install_command}")
    folder = tmp_path_factory.mktemp("gguf")
    (folder / path.name).symlink_to(path)
    return folder / path.name


@pytest.fixture(scope="module")
def reference(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="module")
def tokenizer(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_round_trip_match_transformers(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_digits_are_split_one_per_token(tokenizer, reference):
    # SmolLM2's tokenizer has no multi-digit tokens; "2024" must become four ids.
    ids = tokenizer.encode("2024")
    assert [reference.convert_ids_to_tokens(i) for i in ids] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tokenizer, reference, messages):
    text = tokenizer.apply_chat_template(messages)
    assert text == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode_prompt(messages)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_plain_string_prompt_is_one_user_message(tokenizer):
    ids = tokenizer.encode_prompt("Name a prime.")
    assert ids == tokenizer.encode_prompt([{"role": "user", "content": "Name a prime."}])
    assert ids[0] == tokenizer.hf.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]
    assert tokenizer.encode_prompt("Name a prime.", use_chat_template=False) == tokenizer.encode(
        "Name a prime."
    )


def test_special_ids(tokenizer, reference):
    im_end = reference.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids
    assert tokenizer.eos_token_ids[0] == reference.eos_token_id
    assert tokenizer.pad_token_id == reference.pad_token_id
    assert tokenizer.vocab_size == 49152
    assert tokenizer.encode_response("Seven.") == [*reference.encode("Seven."), im_end]
    assert tokenizer.encode_response("Seven.", add_eos=False) == reference.encode("Seven.")


def test_save_and_reload_keeps_ids_and_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text)
    for messages in CONVERSATIONS:
        assert again.encode_prompt(messages) == tokenizer.encode_prompt(messages)
    assert again.eos_token_ids == tokenizer.eos_token_ids


class _FakeHF:
    """A minimal stand-in for a Llama-2-style tokenizer that adds BOS to plain text."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None
    added_tokens_decoder = {1: "<s>", 2: "</s>"}
    chat_template = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"

    def encode(self, text, add_special_tokens=False):
        ids = [10 + ord(c) for c in text]
        return [1, *ids] if add_special_tokens else ids

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "\x01[INST] " + messages[0]["content"] + " [/INST]"

    def __len__(self):
        return 300


def test_bos_added_once_for_plain_text_and_never_doubled():
    tokenizer = Tokenizer(_FakeHF())
    assert tokenizer.encode_prompt("ab", use_chat_template=False) == [1, 10 + 97, 10 + 98]
    assert tokenizer.pad_token_id == 2  # falls back to EOS
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.encode_response("a") == [107, 2]


def test_truncate_left_reports_cuts():
    assert truncate_left([1, 2, 3], 5) == ([1, 2, 3], False)
    assert truncate_left([1, 2, 3, 4], 2) == ([3, 4], True)
    assert truncate_left([1, 2], 0) == ([], True)
    with pytest.raises(ValueError):
        truncate_left([1], -1)


def test_the_gguf_tokenizer_is_transformers_own(tokenizer, reference):
    # Built here from the metadata (no torch): the same backend, JSON for JSON, and the
    # same special tokens and chat template as transformers' GGUF reader builds.
    assert tokenizer.hf.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    assert tokenizer.hf.special_tokens_map == reference.special_tokens_map
    assert tokenizer.hf.chat_template == reference.chat_template
    assert len(tokenizer.hf) == len(reference)


def test_a_gguf_tokenizer_builds_without_torch(gguf_path):
    # The README's first command installs no torch; transformers' own GGUF reader imports it.
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from jaxalign.tokenizer import Tokenizer\n"
        f"t = Tokenizer.from_gguf({str(gguf_path)!r})\n"
        "print(t.encode('Hello, world!'), t.eos_token_ids)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("[", 1)[1].startswith("19556, 28, 905, 17]")


def write_gguf(path, model, tokens, merges, types, pre=None, bos=None, eos=None, add_bos=None):
    """A GGUF file holding only tokenizer metadata (llama.cpp's keys, via gguf's writer)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_other_gguf_vocabularies_are_left_to_transformers(tmp_path):
    from jaxalign.tokenizer import byte_level_bpe_from_gguf

    def write(name, model, pre):
        return write_gguf(tmp_path / name, model, ["a", "b", "ab"], ["a b"], [1, 1, 1], pre)

    assert byte_level_bpe_from_gguf(write("spm.gguf", "llama", None)) is None
    assert byte_level_bpe_from_gguf(write("l3.gguf", "gpt2", "llama-bpe")) is None  # own split
    built = byte_level_bpe_from_gguf(write("bpe.gguf", "gpt2", None))
    assert built.encode("ab", add_special_tokens=False) == [2]
    assert built.encode("ba", add_special_tokens=False) == [1, 0]


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_written_gguf_encodes_as_transformers_reads_it(tmp_path, add_bos):
    path = write_gguf(
        tmp_path / "tiny.gguf",
        "gpt2",
        ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "<x>"],
        ["a b", "Ġ a"],
        [3, 3, 1, 1, 1, 1, 1, 4],  # control, control, normal..., user-defined
        bos=0,
        eos=1,
        add_bos=add_bos,
    )
    ours = Tokenizer.from_gguf(path).hf
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ("ab a", "b a ab", "a<x>b</s>", ""):
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(
                text, add_special_tokens=special
            )
    assert ours.encode("ab a")[: int(add_bos)] == [0] * int(add_bos)
    assert ours.special_tokens_map == theirs.special_tokens_map
