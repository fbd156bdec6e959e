"""Dataset layouts: pure parsers from a raw record to jaxalign's canonical form.

Canonical forms:

* a preference pair ``{"prompt", "chosen", "rejected", ...}``: ``prompt`` is a string or
  a chat message list ``[{"role", "content"}, ...]`` ending with a user turn; ``chosen``
  and ``rejected`` are the two final assistant responses as strings;
* a prompt ``{"prompt", ...}``.

Fields a layout does not consume (``id``, ``answer``, scores, ...) are kept as they are.
A parser raises ``RecordError(field, expected, reason)`` naming the offending field; the
readers in ``records.py`` turn it into a message with file and line, or a skip counted
under ``reason``. Parsers do no I/O.

Layouts (``LAYOUTS``):

``pairs``          generic ``{prompt, chosen, rejected}``; responses may be message
                   lists whose last message is the assistant's.
``ultrafeedback``  UltraFeedback-binarized: ``chosen``/``rejected`` are message lists
                   ``[user, assistant]`` sharing their context; ``prompt`` is the string
                   field, else the first user message.
``hh``             Anthropic HH-RLHF: ``chosen``/``rejected`` are whole dialogues
                   ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``; the longest shared prefix
                   ending at ``"\\n\\nAssistant:"`` is the prompt (as messages), the rest
                   of each dialogue is its response.
``tldr``           TL;DR summarisation: ``{prompt | post, title, subreddit}`` with
                   ``chosen``/``rejected`` summaries, or OpenAI's comparisons
                   ``{info: {post, title, subreddit}, summaries: [{text}, {text}], choice}``.
``prompts``        prompt-only ``{prompt}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")

# The prompt format of "Learning to summarize from human feedback" (Stiennon et al. 2020),
# as used by the TL;DR preference sets derived from it.
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


class RecordError(Exception):
    """A raw record that does not fit its layout: ``field``, what was ``expected``, ``reason``.

    ``reason`` is the counter key of skipped records: missing_field, bad_field, empty_text,
    identical_pair, too_long, bad_json, not_utf8.
    """

    def __init__(self, field: str, expected: str, reason: str = "bad_field"):
        super().__init__(field, expected)
        self.field, self.expected, self.reason = field, expected, reason


# -- field checks ---------------------------------------------------------------------------


def _require(record: dict, field: str, expected: str):
    if field not in record or record[field] is None:
        raise RecordError(field, expected, "missing_field")
    return record[field]


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(field, f"a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(field, "non-empty text", "empty_text")
    return value


def check_messages(value, field: str) -> list[dict]:
    """A non-empty list of ``{role: str, content: str}`` dicts with non-empty content."""
    if not isinstance(value, list) or not value:
        raise RecordError(field, "a non-empty list of {role, content} messages")
    for i, m in enumerate(value):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise RecordError(f"{field}[{i}]", "a {role, content} message with string values")
        if not m["content"].strip():
            raise RecordError(f"{field}[{i}].content", "non-empty text", "empty_text")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_prompt(record: dict, field: str = "prompt") -> str | list[dict]:
    """A prompt: non-empty string, or a message list."""
    value = _require(record, field, "a prompt string or message list")
    if isinstance(value, list):
        return check_messages(value, field)
    if not isinstance(value, str):
        raise RecordError(field, f"a string or a message list, got {type(value).__name__}")
    return _text(value, field)


def parse_response(record: dict, field: str) -> str:
    """A response: non-empty string, or a message list ending with the assistant's turn."""
    value = _require(record, field, "a response string")
    if isinstance(value, list):
        messages = check_messages(value, field)
        if messages[-1]["role"] != "assistant":
            raise RecordError(field, "a message list ending with the assistant's message")
        return messages[-1]["content"]
    return _text(value, field)


def _with(record: dict, drop: tuple[str, ...] = (), **fields) -> dict:
    out = {k: v for k, v in record.items() if k not in drop}
    out.update(fields)
    return out


# -- layouts --------------------------------------------------------------------------------


def parse_pairs(record: dict) -> dict:
    """Generic ``{prompt, chosen, rejected}`` (strings or message lists)."""
    return _with(
        record,
        prompt=parse_prompt(record),
        chosen=parse_response(record, "chosen"),
        rejected=parse_response(record, "rejected"),
    )


def parse_ultrafeedback(record: dict) -> dict:
    """UltraFeedback-binarized: ``chosen``/``rejected`` = ``[..., user, assistant]`` lists.

    The two lists must share their context (all messages before the last). The prompt is
    the ``prompt`` string when present, else that context (one user message in
    UltraFeedback, so a one-message list).
    """
    expected = "a message list ending with the assistant's message"
    chosen = check_messages(_require(record, "chosen", expected), "chosen")
    rejected = check_messages(_require(record, "rejected", expected), "rejected")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RecordError(field, expected)
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("rejected", "the same context (messages before the last) as 'chosen'")
    if record.get("prompt") is not None:
        prompt = parse_prompt(record)
    else:
        context = chosen[:-1]
        if not context or not any(m["role"] == "user" for m in context):
            raise RecordError(
                "prompt", "a prompt string or a user message in 'chosen'", "missing_field"
            )
        prompt = context if len(context) > 1 else context[0]["content"]
    return _with(
        record, prompt=prompt, chosen=chosen[-1]["content"], rejected=rejected[-1]["content"]
    )


def hh_messages(text: str, field: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` → ``[{user, a}, {assistant, b}]``, stripped."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RecordError(field, "a dialogue starting with '\\n\\nHuman:'")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        if not content.strip():
            raise RecordError(field, f"non-empty text in every {speaker} turn", "empty_text")
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Splits two HH dialogues into ``(prompt messages, chosen response, rejected response)``.

    The prompt is the longest common prefix of the two texts cut back to its last
    ``"\\n\\nAssistant:"``; what follows is each final assistant turn, which must not hold a
    further ``"\\n\\nHuman:"`` turn (that would mean the dialogues differ before the end).
    """
    if not chosen.startswith("\n\n"):  # a few records omit the leading blank line
        chosen = "\n\n" + chosen.lstrip()
    if not rejected.startswith("\n\n"):
        rejected = "\n\n" + rejected.lstrip()
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)
    if cut < 0:
        raise RecordError(
            "chosen", "a dialogue sharing its prefix up to '\\n\\nAssistant:' with 'rejected'"
        )
    prompt = hh_messages(chosen[:cut], "chosen")
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("chosen", "a dialogue whose last shared turn is a Human turn")
    responses = []
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        response = text[cut + len(ASSISTANT) :]
        if _HH_TURN.search(response):
            raise RecordError(
                field,
                "one final Assistant turn after the shared prefix (the dialogues differ "
                "before their last turn)",
            )
        if not response.strip():
            raise RecordError(field, "a non-empty final Assistant turn", "empty_text")
        responses.append(response.strip())
    return prompt, responses[0], responses[1]


def parse_hh(record: dict) -> dict:
    """Anthropic HH-RLHF: ``chosen``/``rejected`` are whole dialogues."""
    chosen = _text(_require(record, "chosen", "a dialogue string"), "chosen")
    rejected = _text(_require(record, "rejected", "a dialogue string"), "rejected")
    if chosen == rejected:
        raise RecordError("rejected", "a dialogue different from 'chosen'", "identical_pair")
    prompt, chosen_text, rejected_text = split_hh_dialogues(chosen, rejected)
    return _with(record, prompt=prompt, chosen=chosen_text, rejected=rejected_text)


def tldr_prompt(info: dict, field: str) -> str:
    """The TL;DR prompt of a ``{post | article, title, subreddit}`` dict."""
    post = info.get("post") if info.get("post") is not None else info.get("article")
    if post is None:
        raise RecordError(f"{field}post", "the post text", "missing_field")
    post = _text(post, f"{field}post")
    title = info.get("title") or ""
    subreddit = info.get("subreddit") or ""
    for key, value in (("title", title), ("subreddit", subreddit)):
        if not isinstance(value, str):
            raise RecordError(f"{field}{key}", f"a string, got {type(value).__name__}")
    return TLDR_TEMPLATE.format(subreddit=subreddit, title=title.strip(), post=post.strip())


def parse_tldr(record: dict) -> dict:
    """TL;DR: prompt/post fields with ``chosen``/``rejected``, or the OpenAI comparisons."""
    if "summaries" in record or "info" in record:
        info = _require(record, "info", "a {post, title, subreddit} dict")
        if not isinstance(info, dict):
            raise RecordError("info", f"a dict, got {type(info).__name__}")
        summaries = _require(record, "summaries", "a list of two {text} summaries")
        if not (isinstance(summaries, list) and len(summaries) == 2):
            raise RecordError("summaries", "a list of two {text} summaries")
        texts = []
        for i, s in enumerate(summaries):
            if not isinstance(s, dict):
                raise RecordError(f"summaries[{i}]", "a {text} dict")
            texts.append(_text(_require(s, "text", "summary text"), f"summaries[{i}].text").strip())
        choice = _require(record, "choice", "0 or 1")
        if isinstance(choice, bool) or choice not in (0, 1):
            raise RecordError("choice", f"0 or 1, got {choice!r}")
        out = _with(
            record,
            drop=("info", "summaries", "choice"),
            prompt=tldr_prompt(info, "info."),
            chosen=texts[choice],
            rejected=texts[1 - choice],
        )
        if "id" not in record and isinstance(info.get("id"), str):
            out["id"] = info["id"]
        return out
    if record.get("prompt") is not None:
        prompt = parse_prompt(record)
    else:
        prompt = tldr_prompt(record, "")
    return _with(
        record,
        drop=("post", "title", "subreddit"),
        prompt=prompt,
        chosen=parse_response(record, "chosen").strip(),
        rejected=parse_response(record, "rejected").strip(),
    )


def parse_prompts(record: dict) -> dict:
    """Prompt-only ``{prompt}`` (other fields, e.g. ``id`` and ``answer``, kept)."""
    return _with(record, prompt=parse_prompt(record))


LAYOUTS: dict[str, Callable[[dict], dict]] = {
    "pairs": parse_pairs,
    "ultrafeedback": parse_ultrafeedback,
    "hh": parse_hh,
    "tldr": parse_tldr,
    "prompts": parse_prompts,
}
PAIR_LAYOUTS = ("pairs", "ultrafeedback", "hh", "tldr")


def get_layout(name: str) -> Callable[[dict], dict]:
    """The parser of layout ``name``; the error lists the known layouts."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(record: dict) -> str:
    """A best guess of the layout of one raw record (for ``jaxalign data inspect``)."""
    if "summaries" in record and "info" in record:
        return "tldr"
    if "chosen" not in record:
        return "prompts"
    chosen = record["chosen"]
    if (
        isinstance(chosen, str)
        and chosen.lstrip("\n").startswith("Human:")
        and "prompt" not in record
    ):
        return "hh"
    if isinstance(chosen, list) and isinstance(record.get("rejected"), list):
        return "ultrafeedback"
    if "post" in record and "prompt" not in record:
        return "tldr"
    return "pairs"
