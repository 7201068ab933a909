"""What a fine-tuned model says: batched generation from a model, an adapter or a run.

Prompts are rendered exactly as in training (``florist.data.encode_prompt``: the chat template
with its generation prompt for conversations, Alpaca's prompt for instruction records), batched
and left-padded, and decoded greedily unless a temperature is given. Generation stops at the
end-of-turn token (the tokenizer's EOS, the model's generation EOS, and the token the chat
template closes an assistant turn with).

The adapter stays unmerged on top of the base model, so ``base()`` switches it off and the same
loaded weights answer as the base model (``--compare_base``) without a second copy in memory.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from florist.errors import FloristError
from florist.evaluation.head import eval_mode
from florist.progress import bar_disabled


@dataclass
class Sampling:
    """How tokens are chosen: greedy at temperature 0 (the default), else nucleus sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 42

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise FloristError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise FloristError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FloristError(f"--top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Loaded:
    """A model ready to generate: the base with the target's adapter on top (unmerged), if any."""

    model: Any
    tokenizer: Any
    target: Any  # florist.cli.eval.Target
    has_adapter: bool

    @contextlib.contextmanager
    def base(self) -> Iterator[Any]:
        """The base model's answers: the adapter switched off for the duration."""
        if not self.has_adapter:
            raise FloristError(f"{self.target.base} has no adapter: there is no base model to compare with")
        with self.model.disable_adapter():
            yield self.model


def load_for_generation(target: str, *, base: str | None = None, device: str = "auto") -> Loaded:
    """TARGET as ``florist eval`` reads it: a model, a PEFT adapter directory or a run directory."""
    from florist.cli.eval import apply_adapter, resolve_target
    from florist.models import load_model

    resolved = resolve_target(target, base)
    model, tokenizer = load_model(resolved.base, device=device)
    if resolved.adapter is None:
        return Loaded(model, tokenizer, resolved, has_adapter=False)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = apply_adapter(model, resolved.adapter)
    peft_model.eval()
    return Loaded(peft_model, tokenizer, resolved, has_adapter=True)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS, the model's generation EOS (one or a list) and the chat template's end-of-turn token."""
    from florist.chat_data import end_of_turn_id

    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(end_of_turn_id(tokenizer))
    return sorted(i for i in ids if i is not None)


class StreamPrinter:
    """A ``generate`` streamer that writes each finished piece of text to ``stream`` at once.

    transformers' TextStreamer holds back text until a word is complete (so multi-byte
    characters never print half); this one writes to any stream and keeps what it printed.
    """

    def __init__(self, tokenizer: Any, stream: TextIO) -> None:
        from transformers import TextStreamer

        printer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                printer.write(text)

        self.streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream, self.pieces = stream, []

    def write(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.stream.write(text)
            self.stream.flush()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with every prompt flush right, as decoder-only generation needs."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    *,
    batch_size: int = 8,
    streamer: StreamPrinter | None = None,
    progress: bool | None = None,
) -> list[str]:
    """The answer to each tokenised prompt (special tokens dropped, surrounding space stripped).

    Prompts are batched by length (less padding) and answered in their given order. Sampling is
    seeded per batch from ``sampling.seed``, so a call gives the same answers every time.
    """
    from transformers import GenerationConfig

    sampling = sampling or Sampling()
    if batch_size <= 0:
        raise FloristError(f"--batch_size must be positive, got {batch_size}")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("streaming works on one prompt at a time")
    if any(len(p) == 0 for p in prompts):
        raise FloristError("an empty prompt: nothing to answer")
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sample = sampling.temperature > 0
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sample,
        temperature=sampling.temperature if sample else None,
        top_p=sampling.top_p if sample else None,
        top_k=0 if sample else None,  # top_p alone decides (transformers samples from the top 50 otherwise)
        eos_token_id=stops,
        pad_token_id=pad_id,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    bar = tqdm(
        total=len(prompts), desc="generating", unit="prompt", disable=bar_disabled(progress), leave=False
    )
    with eval_mode(model), bar:
        for b, start in enumerate(range(0, len(order), batch_size)):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in rows], pad_id)
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(sampling.seed + b)
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                    streamer=streamer.streamer if streamer is not None else None,
                )
            for row, i in enumerate(rows):
                new = out[row, ids.shape[1] :].tolist()
                cut = next((t for t, token in enumerate(new) if token in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
            bar.update(len(rows))
    return answers


# --- prompts ---------------------------------------------------------------------------------


def prompter_for(loaded: Loaded, template: str | None) -> Any:
    """``template``, else the run's own ``prompt_template_name``, else ``auto``."""
    from florist.data import Prompter

    return Prompter(template or loaded.target.run_config.get("prompt_template_name") or "auto")


def _run_trained_on_instructions(run_config: dict[str, Any]) -> bool:
    """Whether a run's clients held instruction data (read from its first client's file)."""
    from florist.chat_data import CONVERSATION_FORMATS
    from florist.data import DataError, _client_dir, detect_format, load_records

    try:
        path = _client_dir(run_config["data_path"], int(run_config["num_clients"])) / "local_training_0.json"
        return detect_format(load_records(path), path) not in CONVERSATION_FORMATS
    except (KeyError, TypeError, ValueError, DataError):
        return False


def text_record(text: str, loaded: Loaded, prompter: Any) -> dict[str, Any]:
    """A bare ``--prompt`` as a record: one user turn, or an instruction for an Alpaca template.

    Under ``auto`` it is an instruction when the run trained on instruction data (or the
    tokenizer has no chat template), a user turn otherwise.
    """
    if not text.strip():
        raise FloristError("--prompt is empty")
    instruction = {"instruction": text, "input": "", "output": ""}
    if prompter.template_name == "chat":
        return {"messages": [{"role": "user", "content": text}]}
    if prompter.template_name != "auto":
        return instruction
    if _run_trained_on_instructions(loaded.target.run_config) or not loaded.tokenizer.chat_template:
        return instruction
    return {"messages": [{"role": "user", "content": text}]}


def answer_records(
    loaded: Loaded,
    records: Sequence[dict],
    prompter: Any,
    sampling: Sampling,
    *,
    compare_base: bool = False,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """One row per record: index, the prompt's messages and rendered text, the reference answer
    (None if the record has none), response (and base_response, the adapter switched off)."""
    from florist.chat_data import prompt_messages
    from florist.data import encode_prompt

    tok = loaded.tokenizer
    prompts = [encode_prompt(r, tok, prompter) for r in records]
    rows = []
    for i, (r, p) in enumerate(zip(records, prompts)):
        messages, reference = prompt_messages(r)
        rows.append({"index": i, "messages": messages, "prompt": tok.decode(p), "reference": reference})
    for row, text in zip(rows, generate(loaded.model, tok, prompts, sampling, batch_size=batch_size)):
        row["response"] = text
    if compare_base:
        with loaded.base() as base:
            for row, text in zip(rows, generate(base, tok, prompts, sampling, batch_size=batch_size)):
                row["base_response"] = text
    return rows


def format_answers(row: dict[str, Any], width: int = 100) -> str:
    """A prompt's answers for the terminal: the last prompt message, then each model's answer."""
    lines = [f"[{row['index']}] {_clip(row['messages'][-1]['content'], width)}"]
    if "base_response" in row:
        lines.append(f"  base:       {_clip(row['base_response'], width)}")
        lines.append(f"  fine-tuned: {_clip(row['response'], width)}")
    else:
        lines.append(f"  answer: {_clip(row['response'], width)}")
    if row.get("reference"):
        lines.append(f"  reference:  {_clip(row['reference'], width)}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
