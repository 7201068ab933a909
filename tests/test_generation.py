"""florist generate and the chat loop on a tiny random Llama: batching, stopping, sampling, base vs
fine-tuned, bad input. (The real model in a real terminal: test_chat_terminal.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from chat_helpers import CONVERSATION, NO_SYSTEM, chat_byte_tokenizer, tiny_base_with_adapter

from florist.cli import main
from florist.data import Prompter, encode_prompt
from florist.generation import Sampling, generate, stop_token_ids
from florist.models import tiny_llama


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, _ = tiny_llama(seed=5)
    return model, chat_byte_tokenizer(adds_bos=False)


def greedy_by_hand(model, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """Greedy decoding without cache, padding or batching: the full sequence every step."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
            ids.append(token)
    return out


PROMPTS = [
    {"messages": CONVERSATION},
    {"messages": NO_SYSTEM[:1]},
    {"messages": [{"role": "user", "content": "A much longer question, so that the batch needs padding?"}]},
]


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    prompts = [encode_prompt(r, tok, Prompter()) for r in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    stops = set(stop_token_ids(model, tok))
    assert tok.eos_token_id in stops  # the byte template ends a turn with </s>
    answers = generate(model, tok, prompts, Sampling(max_new_tokens=12), batch_size=3, progress=False)
    for prompt, answer in zip(prompts, answers):
        want = tok.decode(greedy_by_hand(model, prompt, 12, stops), skip_special_tokens=True).strip()
        assert answer == want


def test_generation_stops_at_the_models_end_of_turn(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    prompt = encode_prompt(PROMPTS[0], tok, Prompter())
    free = greedy_by_hand(model, prompt, 10, set())
    stop = next(t for t in free[3:] if t not in free[:3])  # a token greedy decoding reaches later
    model.generation_config.eos_token_id = stop  # as a model's generation_config names its EOS
    try:
        (answer,) = generate(model, tok, [prompt], Sampling(max_new_tokens=10), progress=False)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert answer == tok.decode(free[: free.index(stop)], skip_special_tokens=True).strip()


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    prompts = [encode_prompt(r, tok, Prompter()) for r in PROMPTS]

    def run(**kw) -> list[str]:
        return generate(model, tok, prompts, Sampling(max_new_tokens=16, **kw), progress=False)

    hot = run(temperature=1.5, seed=1)
    assert run(temperature=1.5, seed=1) == hot
    assert run(temperature=1.5, seed=2) != hot
    assert run(temperature=1.5, top_p=1e-6, seed=3) == run()  # the nucleus is the top token alone


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GGUF base and an adapter on it, plus a chat input file."""
    run = tiny_base_with_adapter(tmp_path_factory.mktemp("generate"), seed=3, scale=0.3)
    run["input"] = run["root"] / "input.jsonl"
    run["input"].write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return run


def test_generate_compare_base_writes_both_answers(tiny_run, monkeypatch, capsys) -> None:
    from florist.cli.eval import load_target, resolve_target
    from florist.models import load_model

    monkeypatch.setenv("FLORIST_CACHE", str(tiny_run["root"] / "cache"))
    out = tiny_run["root"] / "answers.jsonl"
    args = ["generate", str(tiny_run["adapter"]), "--input", str(tiny_run["input"]), "--compare_base"]
    assert main([*args, "--max_new_tokens", "10", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["reference"] == "Green." and rows[0]["messages"] == CONVERSATION[:4]
    assert rows[1]["reference"] is None  # a question without an answer is all prompt

    # independently: the merged model and the plain base, each generating on its own
    merged, tok = load_target(resolve_target(str(tiny_run["adapter"])), device="cpu", dtype=torch.float32)
    base, _ = load_model(str(tiny_run["base"]), device="cpu")
    prompts = [encode_prompt(r, tok, Prompter()) for r in PROMPTS]
    sampling = Sampling(max_new_tokens=10)
    assert [r["response"] for r in rows] == generate(merged, tok, prompts, sampling, progress=False)
    assert [r["base_response"] for r in rows] == generate(base, tok, prompts, sampling, progress=False)
    assert any(r["response"] != r["base_response"] for r in rows)
    printed = capsys.readouterr().out
    assert "base:" in printed and "fine-tuned:" in printed and "reference:  Green." in printed


def test_generate_bad_input_is_one_line_and_writes_nothing(tiny_run, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLORIST_CACHE", str(tiny_run["root"] / "cache"))
    bad = tiny_run["root"] / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    out = tiny_run["root"] / "never.jsonl"
    cases = [
        (["--input", str(bad)], f"{bad}: record 0: message 0: 'content' must be a string"),
        (
            ["--input", str(tiny_run["input"]), "--temperature", "-1"],
            "--temperature must be a finite number >= 0, got -1",
        ),
        (
            ["--input", str(tiny_run["input"]), "--top_p", "0"],
            "--top_p must be a finite number in (0, 1], got 0",
        ),
        (["--prompt", "hi", "--max_records", "0"], "--max_records must be an integer >= 1, got 0"),
        (
            ["--prompt", "hi", "--max_new_tokens", "many"],
            "--max_new_tokens must be an integer >= 1, got many",
        ),
        (["--prompt", "hi", "--input", str(bad)], "not allowed with argument"),
    ]
    for extra, message in cases:
        try:
            code = main(["generate", str(tiny_run["adapter"]), *extra, "--output", str(out)])
        except SystemExit as e:  # argparse's own errors (florist.settings.one_line_errors)
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
        assert not out.exists()
    assert main(["generate", str(tiny_run["base"]), "--prompt", "hi", "--compare_base"]) == 2
    assert "is a model, not an adapter or a run" in capsys.readouterr().err.strip().splitlines()[-1]


def test_chat_loop_keeps_the_conversation_until_clear(model_and_tokenizer) -> None:
    from florist.cli.chat import ANSWER, chat_loop

    model, tok = model_and_tokenizer
    sampling = Sampling(max_new_tokens=8)
    stdin = io.StringIO("Hello\nAgain\nclear\nHello\nexit\nnever read\n")
    stdout = io.StringIO()
    assert chat_loop(model, tok, sampling, system="Be brief.", stdin=stdin, stdout=stdout) == 0
    answers = [part.split("\n", 1)[0] for part in stdout.getvalue().split(ANSWER)[1:]]
    assert len(answers) == 3 and "(conversation cleared)" in stdout.getvalue()

    def expected(messages: list[dict]) -> str:
        ids = encode_prompt({"messages": messages}, tok, Prompter("chat"))
        return generate(model, tok, [ids], sampling, progress=False)[0]

    system = {"role": "system", "content": "Be brief."}
    first = expected([system, {"role": "user", "content": "Hello"}])
    second = expected(
        [
            system,
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Again"},
        ]
    )
    # streamed text is the answer (the byte tokenizer decodes stray bytes to U+FFFD either way)
    assert answers == [first, second, first]
    assert chat_loop(model, tok, sampling, stdin=io.StringIO(""), stdout=io.StringIO()) == 0  # Ctrl-D
