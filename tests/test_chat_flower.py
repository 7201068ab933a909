"""Chat data on Flower SuperNodes, and florist export on a Flower server's output.

The Flower app runs in process on test_flower_strategy's FakeGrid (the real ServerApp logic and
ClientApp handlers, no processes). Each client holds conversations in another format; the
server's adapter must equal florist run's on the same data, and its GGUF export must round-trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from chat_helpers import CONVERSATION, NO_SYSTEM, write_tiny_gguf_base
from conftest import tiny_run_config
from test_flower_strategy import FakeGrid, assert_same_adapter, task_identity  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

from florist.cli import main
from florist.export import merged_model
from florist.federation import run_federated
from florist.flower.app_config import FlowerOptions
from florist.flower.server_app import run_flower_server


def write_chat_clients(root: Path) -> Path:
    """Client 0: TRL messages (JSON array); client 1: ShareGPT (JSON lines); test: prompt/completion."""
    directory = root / "2"
    directory.mkdir(parents=True)
    turns = [CONVERSATION, NO_SYSTEM, CONVERSATION[1:3], NO_SYSTEM[:2]]
    (directory / "local_training_0.json").write_text(json.dumps([{"messages": m} for m in turns]))
    names = {"user": "human", "assistant": "gpt"}
    sharegpt = [
        {
            "system": "Be terse.",
            "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in NO_SYSTEM],
        },
        {
            "conversations": [
                {"from": "human", "value": "Count to three."},
                {"from": "gpt", "value": "1, 2, 3."},
            ]
        },
        {"conversations": [{"from": "human", "value": "Opposite of up?"}, {"from": "gpt", "value": "Down."}]},
    ]
    (directory / "local_training_1.json").write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    test = [
        {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]},
        {"prompt": "Hi?", "completion": "Hello."},
    ]
    (directory / "global_test.json").write_text(json.dumps(test))
    return root


def test_chat_on_flower_nodes_and_export_of_the_server_output(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLORIST_MMLU_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    base = write_tiny_gguf_base(tmp_path / "base.gguf", seed=2)
    data = write_chat_clients(tmp_path / "data")

    def config(out: str):
        return tiny_run_config(
            data,
            tmp_path / out,
            global_model=str(base),
            num_clients=2,
            method="florist",
            threshold=0.9,
            cutoff_len=256,
            lora_dropout=0.0,
            evaluate=True,
            seed=7,
        )

    expected = run_federated(config("inproc"))
    cfg = config("flower")
    metrics = run_flower_server(
        FakeGrid(cfg, data, [4, 4]), cfg, FlowerOptions(round_timeout=30, node_wait_timeout=5)
    )
    assert metrics["flower"]["failures"] == []
    assert_same_adapter(tmp_path / "inproc" / "adapter", tmp_path / "flower" / "adapter")
    # held-out loss on the prompt/completion test file: the completions' assistant tokens
    assert metrics["eval_after"]["heldout"]["n_tokens"] == expected["eval_after"]["heldout"]["n_tokens"] > 0

    out = tmp_path / "flower.gguf"
    assert (
        main(["export", str(tmp_path / "flower"), "--format", "gguf", "--outtype", "f32", "--out", str(out)])
        == 0
    )
    merged, tokenizer, target = merged_model(str(tmp_path / "flower"))
    assert target.kind == "run" and target.base == str(base)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]])
    with torch.no_grad():
        want, got = merged(ids).logits, loaded(ids).logits
    assert float((want - got).abs().max() / want.abs().max()) <= 1e-5
