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


def chatml_reference(tok: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """SmolLM2's ChatML, built by hand: <|im_start|>role\\n content <|im_end|> \\n per turn, after
    the template's default system prompt; labels on the assistant's content and <|im_end|>."""
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    if messages[0]["role"] != "system":
        default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        messages = [{"role": "system", "content": default}, *messages]
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        piece = tok.encode(m["content"], add_special_tokens=False) + [end]
        header = [start, *tok.encode(m["role"] + "\n", add_special_tokens=False)]
        newline = tok.encode("\n", add_special_tokens=False)
        ids += header + piece + newline
        labels += [-100] * len(header) + (piece if m["role"] == "assistant" else [-100] * len(piece))
        labels += [-100] * len(newline)
    return ids, labels


@lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """The embedded SmolLM2-135M-Instruct's tokenizer (ChatML template), as florist loads it."""
    from transformers import AutoTokenizer

    from florist.models import convert_gguf, embedded_gguf_path, prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(convert_gguf(embedded_gguf_path())))


def byte_tokenizer_gguf_fields(chat_template: str = BYTE_CHAT_TEMPLATE) -> dict[str, Any]:
    """florist's byte tokenizer described as GGUF tokenizer metadata (a byte-level BPE without
    merges), in florist.export.tokenizer_fields' form, to write small GGUF test bases with."""
    from gguf import GGUFValueType, TokenType

    from florist.models import byte_tokenizer

    tok = byte_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    specials = set(tok.all_special_tokens)
    types = [int(TokenType.CONTROL if t in specials else TokenType.NORMAL) for t, _ in vocab]
    arr, u32, s = GGUFValueType.ARRAY, GGUFValueType.UINT32, GGUFValueType.STRING
    return {
        "tokenizer.ggml.model": ("gpt2", s, None),
        "tokenizer.ggml.pre": ("default", s, None),
        "tokenizer.ggml.tokens": ([t for t, _ in vocab], arr, s),
        "tokenizer.ggml.token_type": (types, arr, GGUFValueType.INT32),
        # no merges (an empty array is not valid GGUF): transformers derives them from scores
        "tokenizer.ggml.scores": ([0.0] * len(vocab), arr, GGUFValueType.FLOAT32),
        "tokenizer.ggml.bos_token_id": (tok.bos_token_id, u32, None),
        "tokenizer.ggml.eos_token_id": (tok.eos_token_id, u32, None),
        "tokenizer.ggml.padding_token_id": (tok.pad_token_id, u32, None),
        "tokenizer.ggml.unknown_token_id": (tok.unk_token_id, u32, None),
        "tokenizer.ggml.add_bos_token": (False, GGUFValueType.BOOL, None),
        "tokenizer.chat_template": (chat_template, s, None),
    }


def write_tiny_gguf_base(path: Any, *, seed: int = 0) -> Any:
    """A small random Llama written as a GGUF file (f32) with the byte tokenizer and its chat
    template: a base that "came from a GGUF file", as the embedded SmolLM2 does. Its head
    dimension (32) is not hidden/heads (16) and its rope base is not the default, so an export
    that dropped either would show."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from florist.export import write_gguf
    from florist.models import byte_tokenizer

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=50000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return write_gguf(model, path, outtype="f32", tokenizer=byte_tokenizer_gguf_fields(), name="tiny base")


def random_adapter(model: Any, *, rank: int = 4, seed: int = 0, scale: float = 0.05) -> dict:
    """A LoRA with nonzero A and B on every attention and MLP projection of ``model``."""
    import torch

    from florist.aggregation.base import LoraFactors

    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ):
            out_f, in_f = module.weight.shape
            A = torch.randn(rank, in_f, generator=g) * scale
            B = torch.randn(out_f, rank, generator=g) * scale
            adapter[name] = LoraFactors(A=A, B=B, scaling=2.0)
    return adapter


def tiny_base_with_adapter(root: Any, *, seed: int = 0, scale: float = 0.05) -> dict[str, Any]:
    """``root/base.gguf`` (write_tiny_gguf_base) and ``root/adapter`` (random_adapter on it, as a
    PEFT directory naming the base), the base's conversion cached under ``root/cache``."""
    import pytest

    from florist.adapters import write_peft_adapter
    from florist.models import load_model

    base = write_tiny_gguf_base(root / "base.gguf", seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLORIST_CACHE", str(root / "cache"))
        model, _ = load_model(str(base), device="cpu")
    adapter = random_adapter(model, seed=seed + 1, scale=scale)
    write_peft_adapter(root / "adapter", adapter, base_model_name_or_path=str(base))
    return {"root": root, "base": base, "adapter": root / "adapter", "cache": root / "cache"}
