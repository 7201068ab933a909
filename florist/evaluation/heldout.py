"""Held-out loss: mean response-token cross-entropy, perplexity and top-1 accuracy.

Records are normalised instruction data (instruction, input, output), e.g. Dolly's
``global_test.json``, or conversations (messages), whose scored tokens are the assistant turns'
(each with its end-of-turn token). They are prompted and tokenised exactly as in training
(florist.data), so the number is the training objective measured on data no client saw. The
mean is weighted by tokens: every scored token counts once, whatever record it belongs to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from florist.data import IGNORE_INDEX, collate
from florist.errors import FloristError
from florist.evaluation.head import LMHead, eval_mode
from florist.progress import bar_disabled

# Positions per LM-head call: the vocabulary-sized logits are the memory hog, not the model.
HEAD_CHUNK = 1024


def _check_records(records: Sequence[Any]) -> None:
    for i, r in enumerate(records):
        instruction = (
            isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
        )
        conversation = isinstance(r, dict) and isinstance(r.get("messages"), list)
        if not (instruction or conversation):
            raise FloristError(
                f"held-out record {i}: expected a normalised record (string instruction/output, or messages)"
            )


@torch.inference_mode()
def heldout_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    *,
    cutoff_len: int = 512,
    prompter: Any = None,
    batch_size: int = 8,
    max_records: int | None = None,
    train_on_inputs: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Token-weighted loss, perplexity and next-token accuracy on the label tokens of ``records``.

    With ``train_on_inputs=False`` (the default) only the response tokens are scored; in a
    conversation only the assistant's, always. ``prompter`` defaults to ``auto`` (florist.data).
    """
    from florist.data import Prompter, has_trained_token, tokenize_example

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    records = list(records[:max_records] if max_records is not None else records)
    if not records:
        raise ValueError("no held-out records to evaluate")
    _check_records(records)
    prompter = prompter if prompter is not None else Prompter("auto")
    examples = [
        tokenize_example(
            r, tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, prompter=prompter
        )
        for r in records
    ]
    # A record whose response was cut away entirely has nothing to score.
    kept = [i for i, e in enumerate(examples) if has_trained_token(e)]
    scored = [examples[i] for i in kept]
    record_loss = [0.0] * len(scored)  # per record, for bootstrap intervals (florist.stats)
    record_tokens = [0] * len(scored)

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # Run the decoder, then the LM head only where a label is scored (not on prompt or padding).
    # (In the model's dtype, as it has always been; MMLU's letters need the float32 head.)
    decoder, head = model.get_decoder(), LMHead(model, float32=False)

    start = time.perf_counter()
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    order = sorted(range(len(scored)), key=lambda i: len(scored[i]["input_ids"]))
    bar = tqdm(total=len(scored), desc="held-out loss", unit="rec", disable=bar_disabled(progress))
    with eval_mode(model), bar:
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            batch = [scored[i] for i in rows]
            padded = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            ids, mask, labels = padded["input_ids"], padded["attention_mask"], padded["labels"]
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            # Position t predicts token t+1.
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            states, targets = hidden[:, :-1][keep], targets[keep]
            row_of = keep.nonzero()[:, 0]
            token_losses = []
            for c in range(0, len(targets), HEAD_CHUNK):
                logits = head(states[c : c + HEAD_CHUNK])
                tgt = targets[c : c + HEAD_CHUNK]
                token_losses.append(F.cross_entropy(logits, tgt, reduction="none").double())
                total_correct += int((logits.argmax(-1) == tgt).sum())
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=row_of.device)
            per_row.index_add_(0, row_of, torch.cat(token_losses))
            counts = keep.sum(dim=1).tolist()
            for j, i in enumerate(rows):
                record_loss[i], record_tokens[i] = float(per_row[j]), int(counts[j])
            total_loss += float(per_row.sum())
            total_tokens += int(keep.sum())
            bar.update(len(batch))
    if total_tokens == 0:
        raise FloristError(
            f"no response tokens left to score (cutoff_len={cutoff_len} cuts every response away)"
        )
    loss = total_loss / total_tokens
    seconds = time.perf_counter() - start
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "token_accuracy": total_correct / total_tokens,
        "n_tokens": total_tokens,
        "n_records": len(scored),
        "n_skipped": len(examples) - len(scored),
        "seconds": seconds,
        # Per scored record (its index among ``records``): summed loss and scored tokens.
        "records": {"index": kept, "loss_sum": record_loss, "tokens": record_tokens},
    }
