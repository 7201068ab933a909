"""Conversational data: the formats SFT tools store chats in, and the assistant-only loss mask.

Three formats are recognised from their fields (``florist.data.detect_format``):

- ``messages`` (TRL): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "system": str}``
- ``prompt_completion`` (TRL): ``{"prompt": str | messages, "completion": str | messages}``

Each record is normalised to ``{"messages": [...], "prompt_turns": k}`` (plus ``category``): the
first ``k`` messages are context only (the prompt of a prompt/completion pair), so their
assistant turns, if any, are not trained.

The loss mask comes from the tokenizer's own chat template. SmolLM2's template, like most, has no
``{% generation %}`` markers, so the assistant spans are found by rendering prefixes: the text of
the conversation up to assistant turn i with the generation prompt ends where turn i's content
starts, and the text up to and including turn i ends where it stops. The whole conversation is
then tokenised once (no special tokens added: the template writes its own BOS) and a token is
trained when it starts inside an assistant span. A span covers the turn's content and its
end-of-turn token; the whitespace the template writes after that is nobody's turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from florist.records import IGNORE_INDEX, DataError
from florist.records import json_type as _json_type

CONVERSATION_FORMATS = ("messages", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant")
# ShareGPT's speakers; "user"/"assistant" appear in some exports and mean what they say.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class ChatTemplateError(DataError):
    """A tokenizer whose chat template florist cannot train with (none, or prefixes not kept)."""


def conversation_format(keys: set[str]) -> str | None:
    """The conversational format a record's fields say, or None for instruction data."""
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    return None


def _message(item: Any, where: str, i: int, fmt: str) -> dict[str, str]:
    """One message as {"role", "content"}, checked."""
    where = f"{where}: message {i}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {_json_type(item)}")
    if fmt == "sharegpt":
        role_key, content_key, known = "from", "value", SHAREGPT_ROLES
    else:
        role_key, content_key, known = "role", "content", {r: r for r in ROLES}
    for key in (role_key, content_key):
        if key not in item:
            raise DataError(f"{where}: missing field {key!r}")
    role, content = item[role_key], item[content_key]
    if not isinstance(role, str) or role not in known:
        raise DataError(f"{where}: unknown role {role!r} (expected {', '.join(known)})")
    if not isinstance(content, str):
        raise DataError(f"{where}: {content_key!r} must be a string, got {_json_type(content)}")
    return {"role": known[role], "content": content}


def _messages(value: Any, where: str, fmt: str, offset: int = 0) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of messages, got {_json_type(value)}")
    return [_message(item, where, offset + i, fmt) for i, item in enumerate(value)]


def normalize_conversation(
    record: dict, fmt: str, *, where: str = "record", require_assistant: bool = True
) -> dict[str, Any]:
    """{"messages", "prompt_turns"} from a record in one of the chat formats.

    ``require_assistant=False`` accepts prompts without an answer (``florist generate``'s input).
    """
    prompt_turns = 0
    field = {"messages": "messages", "sharegpt": "conversations", "prompt_completion": "prompt"}.get(fmt)
    if field is not None and field not in record:
        raise DataError(f"{where}: missing field {field!r} (a {fmt} record needs it)")
    if fmt == "messages":
        messages = _messages(record.get("messages"), where, fmt)
    elif fmt == "sharegpt":
        messages = _messages(record.get("conversations"), where, fmt)
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise DataError(f"{where}: field 'system' must be a string, got {_json_type(system)}")
            if system:
                messages.insert(0, {"role": "system", "content": system})
    elif fmt == "prompt_completion":
        prompt = record["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = _messages(prompt, f"{where}: prompt", "messages")
        prompt_turns = len(messages)
        completion = record.get("completion")
        if isinstance(completion, str):
            messages.append({"role": "assistant", "content": completion})
        elif completion is not None or require_assistant:
            messages += _messages(completion, f"{where}: completion", "messages", offset=0)
    else:
        raise ValueError(f"unknown conversation format {fmt!r}; expected one of {CONVERSATION_FORMATS}")
    if not messages:
        raise DataError(f"{where}: the conversation is empty")
    if require_assistant and not any(m["role"] == "assistant" for m in messages[prompt_turns:]):
        what = "the completion has" if fmt == "prompt_completion" else "the conversation has"
        raise DataError(f"{where}: {what} no assistant turn, so nothing to learn")
    return {"messages": messages, "prompt_turns": prompt_turns}


def is_conversation(example: dict) -> bool:
    return "messages" in example


def instruction_messages(example: dict) -> list[dict[str, str]]:
    """A normalised instruction record as a user turn (+ the assistant's answer when it has one)."""
    user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    messages = [{"role": "user", "content": user}]
    if example.get("output"):
        messages.append({"role": "assistant", "content": example["output"]})
    return messages


# --------------------------------------------------------------------------------------------
# Rendering with the tokenizer's template


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_chat_tokenizer(tokenizer: Any) -> None:
    """Refuse, in one line, a tokenizer florist cannot build assistant masks with."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the tokenizer of {_name(tokenizer)!r} has no chat template; conversational data needs a "
            "chat model (or use instruction data with --prompt_template_name alpaca)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"the tokenizer of {_name(tokenizer)!r} is not a fast tokenizer; florist maps the chat "
            "template's assistant spans to tokens through a fast tokenizer's offsets"
        )


def render(tokenizer: Any, messages: Sequence[dict], *, generation_prompt: bool = False) -> str:
    """The template's text for ``messages``; template errors become one-line ChatTemplateErrors."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as e:
        raise ChatTemplateError(
            f"the chat template of {_name(tokenizer)!r} refused the conversation: {e}"
        ) from None


def assistant_spans(
    tokenizer: Any, messages: Sequence[dict], prompt_turns: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its trained assistant turns."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < prompt_turns:
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(
                f"the chat template of {_name(tokenizer)!r} does not preserve prefixes (rendering the "
                f"first {i + 1} messages is not a prefix of rendering all {len(messages)}), so florist "
                "cannot tell which tokens are the assistant's; use a template without that rewriting"
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_conversation(example: dict, tokenizer: Any, *, cutoff_len: int) -> dict[str, list[int]]:
    """{"input_ids", "labels"}: the rendered conversation, labels -100 outside assistant spans."""
    check_chat_tokenizer(tokenizer)
    text, spans = assistant_spans(tokenizer, example["messages"], example.get("prompt_turns", 0))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])[:cutoff_len]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, _end) in enumerate(encoded["offset_mapping"][: len(ids)]):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels}


def prompt_messages(example: dict) -> tuple[list[dict[str, str]], str | None]:
    """What a model is asked and the reference answer (None when the record has none).

    The prompt is every message before the last assistant turn (a prompt/completion pair: the
    prompt). A conversation that ends with the user's turn is all prompt.
    """
    messages = example["messages"] if is_conversation(example) else instruction_messages(example)
    k = example.get("prompt_turns", 0)
    if k:
        answers = [m["content"] for m in messages[k:] if m["role"] == "assistant"]
        return list(messages[:k]), (answers[0] if answers else None)
    if messages[-1]["role"] != "assistant":
        return list(messages), None
    return list(messages[:-1]), messages[-1]["content"]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (None if there is none),
    found by rendering a turn and reading what follows its text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "florist-end-of-turn-probe"
    try:
        text = render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}])
    except ChatTemplateError:
        return None
    after = text[text.rfind(marker) + len(marker) :] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    return ids[0] if ids and ids[0] in special else None
