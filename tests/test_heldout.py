"""Held-out instruction loss against a by-hand computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from florist.errors import FloristError
from florist.evaluation.heldout import heldout_loss
from florist.models import tiny_llama

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Name a colour " * 4, "input": "", "output": "Blue, like the sky on a clear day."},
    {"instruction": "Translate.", "input": "chat", "output": "cat"},
]


@torch.no_grad()
def reference(model, tokenizer, records, *, train_on_inputs: bool = False) -> tuple[float, float, int]:
    """Sum of -log p and of top-1 hits over the scored tokens, one unpadded record at a time."""
    nll, hits, count = 0.0, 0, 0
    for r in records:
        template = WITH_INPUT if r["input"] else NO_INPUT
        prompt = template.format(instruction=r["instruction"], input=r["input"])
        ids = tokenizer(prompt + r["output"])["input_ids"] + [tokenizer.eos_token_id]
        first = 1 if train_on_inputs else len(tokenizer(prompt)["input_ids"])
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(first, len(ids)):  # token t is predicted at position t - 1
            nll -= float(logp[t - 1, ids[t]])
            hits += int(int(logp[t - 1].argmax()) == ids[t])
            count += 1
    return nll / count, hits / count, count


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_heldout_loss_matches_by_hand(train_on_inputs: bool) -> None:
    model, tok = tiny_llama(seed=1)
    loss, accuracy, count = reference(model, tok, RECORDS, train_on_inputs=train_on_inputs)
    result = heldout_loss(model, tok, RECORDS, batch_size=3, train_on_inputs=train_on_inputs, progress=False)
    assert result["n_tokens"] == count and result["n_records"] == len(RECORDS)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["token_accuracy"] == pytest.approx(accuracy)
    # Batching does not change a token-weighted mean.
    single = heldout_loss(model, tok, RECORDS, batch_size=1, train_on_inputs=train_on_inputs, progress=False)
    assert single["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_heldout_on_a_peft_model_max_records_and_truncation() -> None:
    from peft import LoraConfig, get_peft_model

    base, tok = tiny_llama(seed=2)
    plain = heldout_loss(base, tok, RECORDS, progress=False)["loss"]
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.train()
    loss, _, count = reference(model.eval(), tok, RECORDS[:2])
    model.train()
    result = heldout_loss(model, tok, RECORDS, max_records=2, progress=False)
    assert model.training
    assert result["n_tokens"] == count and result["loss"] == pytest.approx(loss, rel=1e-5)
    assert heldout_loss(model, tok, RECORDS, progress=False)["loss"] != pytest.approx(plain)

    # A cutoff inside the prompt leaves a record nothing to score: it is skipped and counted.
    cutoff = len(tok(NO_INPUT.format(instruction=RECORDS[2]["instruction"]))["input_ids"]) - 1
    short = heldout_loss(model, tok, RECORDS, cutoff_len=cutoff, progress=False)
    assert short["n_skipped"] >= 1 and short["n_records"] + short["n_skipped"] == len(RECORDS)


def test_heldout_errors() -> None:
    model, tok = tiny_llama(seed=0)
    with pytest.raises(FloristError, match="held-out record 1"):
        heldout_loss(model, tok, [RECORDS[0], {"instruction": "x"}], progress=False)
    with pytest.raises(ValueError, match="no held-out records"):
        heldout_loss(model, tok, [], progress=False)
    with pytest.raises(FloristError, match="no response tokens"):
        heldout_loss(model, tok, RECORDS[:1], cutoff_len=5, progress=False)
