"""The practitioner's loop on the real embedded SmolLM2, through the CLI: split chat data, a
two-client florist run that lowers held-out assistant-token loss, generate --compare_base on its
output, and export it as GGUF (q8_0) that transformers reads back with >= 99% greedy agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from chat_helpers import chatml_reference, smollm2_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from florist.cli import main
from florist.data import demo_data_path, load_dataset_file
from florist.export import merged_model
from florist.generation import Sampling, generate

CHAT_DATA = demo_data_path().parent / "chat" / "conversations.jsonl"
EVAL_RECORDS = 8


@pytest.mark.slow
def test_chat_data_run_generate_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("FLORIST_MMLU_PATH", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray MMLU file: this run measures held-out loss only
    monkeypatch.setenv("FLORIST_PROGRESS", "0")
    data, run = tmp_path / "data", tmp_path / "run"

    split = [
        "data",
        "split",
        str(CHAT_DATA),
        "--num-clients",
        "2",
        "--test-per-label",
        "2",
        "--out",
        str(data),
    ]
    assert main(split) == 0
    settings = {
        "data_path": data,
        "num_clients": 2,
        "method": "florist",
        "output_dir": run,
        "lora_r": 8,
        "lora_alpha": 16,
        "local_batch_size": 2,
        "local_micro_batch_size": 2,
        "local_max_steps": 4,
        "local_learning_rate": 3e-3,
        "max_samples_per_client": 8,
        "cutoff_len": 192,
        "eval_samples": EVAL_RECORDS,
        "device": "cpu",
    }
    assert main(["run", *[f"--{k}={v}" for k, v in settings.items()]]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["eval_before"]["heldout"], metrics["eval_after"]["heldout"]
    assert after["loss"] < before["loss"], (before, after)

    # scored: exactly the assistant tokens (with their <|im_end|>) of the held-out conversations
    heldout, fmt = load_dataset_file(data / "2" / "global_test.json")
    assert fmt == "messages" and any(r["messages"][0]["role"] == "system" for r in heldout)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in heldout)
    tok = smollm2_tokenizer()
    labels = [chatml_reference(tok, r["messages"])[1] for r in heldout[:EVAL_RECORDS]]
    assert before["n_tokens"] == after["n_tokens"] == sum(sum(t != -100 for t in x[1:]) for x in labels)

    # generate --compare_base on the run's output
    answers = tmp_path / "answers.jsonl"
    gen = ["generate", str(run), "--input", str(data / "2" / "global_test.json"), "--max_records", "3"]
    assert main([*gen, "--compare_base", "--max_new_tokens", "24", "--output", str(answers)]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 3 and all(r["response"] and r["base_response"] and r["reference"] for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)

    # export --format gguf: transformers reads it back; greedy next tokens agree with the merged model
    gguf = tmp_path / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--outtype", "q8_0", "--out", str(gguf)]) == 0
    merged, _, _ = merged_model(str(run))
    # the fine-tuned answers are the merged model's (greedy, same prompts)
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    merged_answers = generate(merged, tok, prompts, Sampling(max_new_tokens=24), progress=False)
    assert merged_answers == [r["response"] for r in rows]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings and loaded.config.rope_parameters["rope_theta"] == 100000.0
    agree = total = 0
    with torch.no_grad():
        for r in heldout[:8]:
            ids = torch.tensor([chatml_reference(tok, r["messages"])[0]])
            a, b = merged(ids).logits.argmax(-1), loaded(ids).logits.argmax(-1)
            agree, total = agree + int((a == b).sum()), total + a.numel()
    assert total > 500 and agree / total >= 0.99, agree / total
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name).chat_template == tok.chat_template
