"""Shared pieces of the chat, generation and export tests: a byte tokenizer with a chat template,
the real SmolLM2 tokenizer, and sample conversations."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

# A Zephyr-like template that writes BOS itself and injects a default system prompt, as many
# real templates do; "</s>" (the byte tokenizer's EOS) ends every turn.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>\nBe helpful.{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_SYSTEM = "Be helpful."

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Sky colour?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Grass?"},
    {"role": "assistant", "content": "Green."},
]
NO_SYSTEM = [
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two."},
]


def chat_byte_tokenizer(*, adds_bos: bool = True) -> Any:
    """florist's byte tokenizer with BYTE_CHAT_TEMPLATE; ``adds_bos``: tokenizing adds BOS too
    (as Llama tokenizers do), so a double BOS would show."""
    from tokenizers import processors

    from florist.models import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = BYTE_CHAT_TEMPLATE
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
        )
    return tok


def byte_reference(tok: Any, messages: list[dict], prompt_turns: int = 0) -> tuple[list[int], list[int]]:
    """The ids and labels BYTE_CHAT_TEMPLATE should give, built by hand, piece by piece: one BOS,
    then each turn's header and content bytes, EOS and newline; labels on the assistant's
    content and EOS only."""
    ids, labels = [tok.bos_token_id], [-100]

    def add(piece: list[int], learn: bool) -> None:
        ids.extend(piece)
        labels.extend(piece if learn else [-100] * len(piece))

    def text(s: str) -> list[int]:
        return list(s.encode("utf-8"))  # the byte tokenizer: byte b is id b

    turns = list(messages)
    if turns[0]["role"] != "system":
        turns = [{"role": "system", "content": DEFAULT_SYSTEM}] + turns
        prompt_turns += 1
    for i, m in enumerate(turns):
        learn = m["role"] == "assistant" and i >= prompt_turns
        add(text(f"<|{m['role']}|>\n"), False)
        add(text(m["content"]) + [tok.eos_token_id], learn)
        add(text("\n"), False)
    return ids, labels


@lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """The embedded SmolLM2-135M-Instruct's tokenizer (ChatML template), as florist loads it."""
    from transformers import AutoTokenizer

    from florist.models import convert_gguf, embedded_gguf_path, prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(convert_gguf(embedded_gguf_path())))
