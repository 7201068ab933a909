"""Conversational data: formats, bad records, chat templates and the assistant-only loss mask.

The masks are checked token by token against an independent construction: the ids and labels
built by hand, piece by piece, from what the template is known to write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from chat_helpers import (
    CONVERSATION,
    NO_SYSTEM,
    byte_reference,
    chat_byte_tokenizer,
    chatml_reference,
    smollm2_tokenizer,
)

from florist import data
from florist.chat_data import ChatTemplateError
from florist.cli import main
from florist.data import DataError, Prompter, load_dataset_file, tokenize_dataset, tokenize_example

# --------------------------------------------------------------------------------------------
# Formats


def _write(path: Path, records: list, jsonl: bool) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("jsonl", [False, True])
def test_every_chat_format_normalises_to_the_same_messages(tmp_path: Path, jsonl: bool) -> None:
    sharegpt = {
        "system": "You answer in one word.",
        "conversations": [
            {"from": "human", "value": "Sky colour?"},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Grass?"},
            {"from": "gpt", "value": "Green."},
        ],
    }
    cases = {
        "messages": ({"messages": CONVERSATION, "category": "colours"}, CONVERSATION, 0),
        "sharegpt": (sharegpt, CONVERSATION, 0),
        "prompt_completion": (
            {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]},
            CONVERSATION,
            4,
        ),
    }
    for fmt, (record, messages, prompt_turns) in cases.items():
        records, detected = load_dataset_file(_write(tmp_path / f"{fmt}.json", [record, record], jsonl))
        assert detected == fmt
        assert records[1]["messages"] == messages and records[1]["prompt_turns"] == prompt_turns
    records, fmt = load_dataset_file(
        _write(tmp_path / "pc.json", [{"prompt": "Sky colour?", "completion": "Blue."}], jsonl)
    )
    assert fmt == "prompt_completion"
    assert records[0]["messages"] == [
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."},
    ]
    assert (
        load_dataset_file(_write(tmp_path / "m.json", [{"messages": CONVERSATION, "category": "c"}], jsonl))[
            0
        ][0]["category"]
        == "c"
    )


BAD = {
    "unknown role": (
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "message 0: unknown role 'tool'",
    ),
    "sharegpt role": ({"conversations": [{"from": "bot", "value": "x"}]}, "message 0: unknown role 'bot'"),
    "non-string content": (
        {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
        "message 0: 'content' must be a string, got an array",
    ),
    "no assistant turn": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    "empty conversation": ({"messages": []}, "the conversation is empty"),
    "completion without assistant": (
        {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]},
        "the completion has no assistant turn",
    ),
    "messages not a list": ({"messages": "hello"}, "expected a list of messages, got a string"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_chat_records_name_the_file_and_the_record(tmp_path: Path, case: str) -> None:
    bad, message = BAD[case]
    fmt_key = next(iter(bad))
    good = (
        {"messages": CONVERSATION}
        if fmt_key == "messages"
        else {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
        if fmt_key == "conversations"
        else {"prompt": "a", "completion": "b"}
    )
    path = _write(tmp_path / "chat.jsonl", [good, bad], jsonl=True)
    with pytest.raises(DataError) as err:
        load_dataset_file(path)
    text = str(err.value)
    assert text.startswith(f"{path}: record 1") and message in text and "\n" not in text


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_refuses_a_bad_chat_record_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}
    src = _write(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}] * 30 + [bad], jsonl=True)
    out = tmp_path / "split"
    assert main(["data", "split", str(src), "--num-clients", "2", "--mode", "iid", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"{src}: record 30: message 1: unknown role 'robot'" in line
    assert not out.exists()

    # a client's file with the bad record: florist run stops before loading a model
    layout = tmp_path / "data" / "2"
    layout.mkdir(parents=True)
    _write(layout / "local_training_0.json", [{"messages": CONVERSATION}], jsonl=False)
    _write(layout / "local_training_1.json", [{"messages": CONVERSATION}, bad], jsonl=False)
    run_out = tmp_path / "run"
    code = main(
        ["run", "--data_path", str(tmp_path / "data"), "--num_clients", "2", "--output_dir", str(run_out)]
    )
    assert code == 2
    assert "local_training_1.json: record 1: message 1: unknown role 'robot'" in _one_error_line(capsys)
    assert not run_out.exists()


def test_data_split_writes_chat_clients_that_load_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = data.demo_data_path().parent / "chat" / "conversations.jsonl"
    args = ["data", "split", str(src), "--num-clients", "2", "--mode", "dirichlet", "--test-per-label", "2"]
    assert main([*args, "--out", str(tmp_path / "d")]) == 0
    clients = data.load_client_datasets(tmp_path / "d", 2)
    test, fmt = load_dataset_file(tmp_path / "d" / "2" / "global_test.json")
    assert fmt == "messages" and len(test) == 16
    assert sum(map(len, clients)) + len(test) == 200
    assert all("messages" in r for c in clients for r in c)


# --------------------------------------------------------------------------------------------
# Masks, token by token


@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM], ids=["system", "default-system"])
def test_byte_template_mask_equals_the_hand_built_one(messages: list[dict]) -> None:
    tok = chat_byte_tokenizer(adds_bos=True)  # tokenizing adds BOS: the template's own must be the only one
    got = tokenize_example(
        {"messages": messages}, tok, cutoff_len=4096, train_on_inputs=True, prompter=Prompter()
    )
    ids, labels = byte_reference(tok, messages)
    assert got["input_ids"] == ids
    assert got["labels"] == labels
    assert got["input_ids"].count(tok.bos_token_id) == 1
    # every assistant turn is learned, each with its end-of-turn token, and nothing else is
    learned = bytes(t for t in got["labels"] if 0 <= t < 256).decode()
    assert learned == "".join(m["content"] for m in messages if m["role"] == "assistant")
    assert sum(t == tok.eos_token_id for t in got["labels"]) == sum(
        m["role"] == "assistant" for m in messages
    )


def test_prompt_completion_learns_the_completion_only() -> None:
    tok = chat_byte_tokenizer()
    record = data.normalize_record(
        {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}, "prompt_completion"
    )
    got = tokenize_example(record, tok, cutoff_len=4096, train_on_inputs=True, prompter=Prompter("chat"))
    assert (got["input_ids"], got["labels"]) == byte_reference(tok, CONVERSATION, prompt_turns=4)
    assert bytes(t for t in got["labels"] if 0 <= t < 256) == b"Green."


@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM], ids=["system", "default-system"])
def test_smollm2_mask_equals_the_hand_built_chatml(messages: list[dict]) -> None:
    tok = smollm2_tokenizer()
    got = tokenize_example(
        {"messages": messages}, tok, cutoff_len=4096, train_on_inputs=True, prompter=Prompter()
    )
    ids, labels = chatml_reference(tok, messages)
    assert got["input_ids"] == ids
    assert got["labels"] == labels


def test_templates_florist_cannot_mask_are_refused_in_one_line() -> None:
    tok = chat_byte_tokenizer()
    # Like templates that drop earlier turns' reasoning: earlier assistant turns render differently.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|a|>...{% else %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="does not preserve prefixes") as err:
        tokenize_example(
            {"messages": NO_SYSTEM}, tok, cutoff_len=512, train_on_inputs=True, prompter=Prompter()
        )
    assert "\n" not in str(err.value)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tokenize_example(
            {"messages": NO_SYSTEM}, tok, cutoff_len=512, train_on_inputs=True, prompter=Prompter()
        )
    # a template error (here: roles must alternate) is one line naming the record
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(DataError, match=r"client_3: record 0: .*roles must alternate"):
        tokenize_dataset(
            [{"messages": NO_SYSTEM}], tok, cutoff_len=512, train_on_inputs=True, desc="client_3"
        )


def test_truncation_that_leaves_no_trained_token_drops_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    tok = chat_byte_tokenizer()
    long_user = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    records = [{"messages": NO_SYSTEM}, {"messages": long_user}, {"messages": CONVERSATION}]
    out = tokenize_dataset(records, tok, cutoff_len=128, train_on_inputs=True, desc="tokenizing client_1")
    assert out.dropped == 1 and len(out) == 2
    assert out[1] == tokenize_example(
        records[2], tok, cutoff_len=128, train_on_inputs=True, prompter=Prompter()
    )
    assert "client_1: dropped 1 of 3 records" in capsys.readouterr().out
    # cut inside an answer: the part before the cut is still learned
    cut = tokenize_example(records[0], tok, cutoff_len=60, train_on_inputs=True, prompter=Prompter())
    assert cut["input_ids"] == byte_reference(tok, NO_SYSTEM)[0][:60]
    with pytest.raises(DataError, match="leaves none of its 1 records a trained token"):
        tokenize_dataset([records[1]], tok, cutoff_len=128, train_on_inputs=True, desc="tokenizing client_1")


# --------------------------------------------------------------------------------------------
# Templates: auto, chat, alpaca


def test_auto_keeps_alpaca_for_instructions_and_chat_renders_them_as_turns() -> None:
    tok = chat_byte_tokenizer()
    record = {"instruction": "Name a colour.", "input": "Warm ones.", "output": "Red."}
    auto = tokenize_example(record, tok, cutoff_len=512, train_on_inputs=False, prompter=Prompter("auto"))
    assert auto == tokenize_example(
        record, tok, cutoff_len=512, train_on_inputs=False, prompter=Prompter("alpaca")
    )
    chat = tokenize_example(record, tok, cutoff_len=512, train_on_inputs=False, prompter=Prompter("chat"))
    turns = [
        {"role": "user", "content": "Name a colour.\n\nWarm ones."},
        {"role": "assistant", "content": "Red."},
    ]
    assert (chat["input_ids"], chat["labels"]) == byte_reference(tok, turns)
    with pytest.raises(DataError, match="conversations need --prompt_template_name auto or chat"):
        tokenize_example(
            {"messages": NO_SYSTEM}, tok, cutoff_len=512, train_on_inputs=True, prompter=Prompter("alpaca")
        )
    with pytest.raises(DataError, match="prompt template 'chatml' not found"):
        Prompter("chatml")


def test_encode_prompt_is_the_training_text_up_to_the_answer() -> None:
    tok = chat_byte_tokenizer()
    ids, labels = byte_reference(tok, CONVERSATION)
    prompt = data.encode_prompt({"messages": CONVERSATION}, tok, Prompter())
    # the last answer starts right after the prompt, and everything before it is the prompt
    first_of_last_answer = max(i for i in range(len(labels)) if labels[i] != -100 and labels[i - 1] == -100)
    assert prompt == ids[:first_of_last_answer]


# --------------------------------------------------------------------------------------------
# Held-out loss on conversations


def test_heldout_loss_on_chat_is_over_assistant_tokens_only() -> None:
    from florist.evaluation.heldout import heldout_loss
    from florist.models import tiny_llama

    model, _ = tiny_llama(seed=3)
    tok = chat_byte_tokenizer()
    records = [{"messages": CONVERSATION}, {"messages": NO_SYSTEM}]
    got = heldout_loss(model, tok, records, cutoff_len=512, batch_size=2, progress=False)

    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:  # one record at a time, no padding, full logits
            ids, labels = byte_reference(tok, r["messages"])
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    assert (
        got["n_tokens"]
        == count
        == sum(len(m["content"]) + 1 for r in records for m in r["messages"] if m["role"] == "assistant")
    )
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
