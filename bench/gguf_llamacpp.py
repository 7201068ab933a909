"""A florist GGUF export, loaded by llama.cpp itself (llama-cpp-python), against the merged model.

    python bench/gguf_llamacpp.py [--run DIR] [--llama-python PYTHON] [--out docs/gguf_llamacpp.json]

Without ``--run`` it first makes the test suite's two-client chat run on the embedded SmolLM2
(florist data split + florist run, a few minutes on 2 cores). It exports the run with
``florist export --format gguf`` at f32, f16 and q8_0 and asks llama.cpp, for each file:

- to tokenise the held-out conversations (rendered by the chat template): the same ids as the
  Hugging Face tokenizer florist trained with?
- for its logits at every position of those conversations: the same greedy next token as the
  merged float32 model in transformers (and, for f32, how far the logits are);
- to answer the held-out prompts through its own chat-completion API (the chat template read
  from the GGUF, greedy): the same text as ``florist generate``?

llama-cpp-python need not be installed beside florist: the llama.cpp side runs in a subprocess of
``--llama-python`` (a Python with ``llama_cpp``; default: this one), with this file's
``--llama-side`` mode, which imports neither torch nor florist. Tests never need it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 32
N_CONVERSATIONS = 8


# --- the llama.cpp side (no torch, no florist) ---------------------------------------------------


def llama_side(request_path: str, reply_path: str) -> None:
    import llama_cpp
    import numpy as np

    request = json.loads(Path(request_path).read_text())
    # An f32 file is read with an f32 KV cache too (llama.cpp's default cache is f16).
    cache = (
        {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        if request["want_logits"]
        else {}
    )
    llm = llama_cpp.Llama(request["gguf"], n_ctx=1024, logits_all=True, verbose=False, seed=0, **cache)
    reply: dict = {"llama_cpp_python": llama_cpp.__version__, "tokens": [], "argmax": [], "logits": []}
    for text in request["texts"]:
        reply["tokens"].append(llm.tokenize(text.encode(), add_bos=False, special=True))
    for ids in request["ids"]:
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        reply["argmax"].append(scores.argmax(-1).tolist())
        reply["logits"].append(scores[-1].tolist() if request["want_logits"] else None)
    answers = []
    for messages in request["chats"]:
        llm.reset()
        out = llm.create_chat_completion(
            messages=messages, max_tokens=request["max_new_tokens"], temperature=0.0
        )
        answers.append(out["choices"][0]["message"]["content"].strip())
    reply["answers"] = answers
    Path(reply_path).write_text(json.dumps(reply))


# --- the florist side ------------------------------------------------------------------------


def make_run(root: Path) -> Path:
    from florist.cli import main

    data = root / "data"
    source = REPO / "florist" / "resources" / "chat" / "conversations.jsonl"
    assert (
        main(
            ["data", "split", str(source), "--num-clients", "2", "--test-per-label", "2", "--out", str(data)]
        )
        == 0
    )
    flags = (
        f"--data_path={data} --num_clients=2 --method=florist --output_dir={root / 'run'} --lora_r=8 "
        "--lora_alpha=16 --local_batch_size=2 --local_micro_batch_size=2 --local_max_steps=4 "
        "--local_learning_rate=3e-3 --max_samples_per_client=8 --cutoff_len=192 --eval_samples=8 --device=cpu"
    )
    assert main(["run", *flags.split()]) == 0
    return root / "run"


def heldout_of(run: Path) -> list[dict]:
    from florist.data import find_test_file, load_dataset_file

    config = json.loads((run / "metrics.json").read_text())["config"]
    records, _ = load_dataset_file(find_test_file(config["data_path"], config["num_clients"]))
    return records[:N_CONVERSATIONS]


def compare(run: Path, outtype: str, root: Path, llama_python: str, merged, tok, heldout) -> dict:
    import torch

    from florist.chat_data import prompt_messages
    from florist.cli import main
    from florist.data import Prompter, encode_prompt
    from florist.generation import Sampling, generate

    gguf = root / f"model-{outtype}.gguf"
    started = time.perf_counter()
    assert main(["export", str(run), "--format", "gguf", "--outtype", outtype, "--out", str(gguf)]) == 0
    export_seconds = time.perf_counter() - started
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in heldout]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    chats = [prompt_messages(r)[0] for r in heldout]
    request = {
        "gguf": str(gguf),
        "texts": texts,
        "ids": ids,
        "chats": chats,
        "max_new_tokens": MAX_NEW_TOKENS,
        "want_logits": outtype == "f32",
    }
    (root / "request.json").write_text(json.dumps(request))
    subprocess.run(
        [llama_python, __file__, "--llama-side", str(root / "request.json"), str(root / "reply.json")],
        check=True,
    )
    reply = json.loads((root / "reply.json").read_text())

    agree = total = 0
    worst = 0.0
    with torch.no_grad():
        for k, seq in enumerate(ids):
            logits = merged(torch.tensor([seq])).logits[0]
            mine = logits.argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(mine, reply["argmax"][k]))
            total += len(seq)
            if reply["logits"][k] is not None:
                theirs = torch.tensor(reply["logits"][k])
                worst = max(worst, float((theirs - logits[-1]).abs().max() / logits[-1].abs().max()))
    prompts = [encode_prompt(r, tok, Prompter()) for r in heldout]
    florist_answers = generate(merged, tok, prompts, Sampling(max_new_tokens=MAX_NEW_TOKENS), progress=False)
    same_answers = sum(a == b for a, b in zip(florist_answers, reply["answers"]))
    return {
        "outtype": outtype,
        "file_mb": round(gguf.stat().st_size / 1e6, 1),
        "export_seconds": round(export_seconds, 1),
        "llama_cpp_python": reply["llama_cpp_python"],
        "tokenisation_identical": sum(a == b for a, b in zip(ids, reply["tokens"])),
        "conversations": len(ids),
        "greedy_agreement": agree / total,
        "positions": total,
        "last_position_logits_max_relative_diff": worst if outtype == "f32" else None,
        "chat_answers_identical_to_florist_generate": same_answers,
        "examples": [
            {
                "prompt": chats[i][-1]["content"],
                "llama_cpp": reply["answers"][i],
                "florist": florist_answers[i],
            }
            for i in range(2)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a florist run directory (default: make the chat run)")
    parser.add_argument("--llama-python", default=sys.executable, help="a Python with llama_cpp installed")
    parser.add_argument("--out", default=str(REPO / "docs" / "gguf_llamacpp.json"))
    parser.add_argument("--llama-side", nargs=2, metavar=("REQUEST", "REPLY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_side:
        llama_side(*args.llama_side)
        return

    from florist.export import merged_model
    from florist.io import atomic_write_json

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = Path(args.run) if args.run else make_run(root)
        merged, tok, _ = merged_model(str(run))
        heldout = heldout_of(run)
        results = {
            "run": str(run)
            if args.run
            else "the two-client chat run of tests/test_chat_e2e.py (made afresh)",
            "machine": platform.machine(),
            "exports": [
                compare(run, t, root, args.llama_python, merged, tok, heldout) for t in ("f32", "f16", "q8_0")
            ],
        }
    atomic_write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
