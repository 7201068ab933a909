"""``florist chat``: talk to a model, an adapter or a run in the terminal.

    florist chat TARGET [--system TEXT] [--max_new_tokens 256] [--temperature 0] [--top_p 1]

TARGET is what ``florist generate`` takes. Each answer streams as it is generated, rendered with
the tokenizer's chat template over the whole conversation so far. Type ``clear`` to start a new
conversation and ``exit`` (or Ctrl-D) to leave.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from florist.cli.generate import SAMPLING_FLAGS, add_sampling_flags, sampling_from
from florist.settings import check_args

PROMPT = "you> "
ANSWER = "assistant> "


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chat",
        help="an interactive chat with a model, adapter or run (answers stream)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sampling_flags(p)
    p.add_argument("--system", default=None, help="a system message that opens every conversation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_args(args, SAMPLING_FLAGS)
    from florist.chat_data import check_chat_tokenizer
    from florist.generation import load_for_generation

    sampling = sampling_from(args)
    loaded = load_for_generation(args.target, base=args.base, device=args.device)
    check_chat_tokenizer(loaded.tokenizer)
    kind = loaded.target.kind if loaded.has_adapter else "model"
    print(f"florist chat: {args.target} ({kind}). 'clear' starts over, 'exit' quits.", flush=True)
    return chat_loop(loaded.model, loaded.tokenizer, sampling, system=args.system)


def chat_loop(
    model: Any,
    tokenizer: Any,
    sampling: Any,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Read a line, stream the answer, repeat; the conversation grows until ``clear``."""
    from florist.data import Prompter, encode_prompt
    from florist.generation import StreamPrinter, generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    chat = Prompter("chat")
    limit = getattr(model.config, "max_position_embeddings", None)
    while True:
        stdout.write(PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            stdout.write("\n")
            return 0
        text = line.strip()
        if text in ("exit", "quit"):
            return 0
        if text == "clear":
            history = list(opening)
            stdout.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = encode_prompt({"messages": history}, tokenizer, chat)
        # Forget the oldest exchanges rather than run past the model's context.
        while limit and len(ids) + sampling.max_new_tokens > limit and len(history) > len(opening) + 1:
            del history[len(opening) : len(opening) + 2]
            ids = encode_prompt({"messages": history}, tokenizer, chat)
        stdout.write(ANSWER)
        printer = StreamPrinter(tokenizer, stdout)
        (answer,) = generate(model, tokenizer, [ids], sampling, streamer=printer, progress=False)
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer})
