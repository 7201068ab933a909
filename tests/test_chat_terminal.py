"""florist chat on the real embedded SmolLM2: answers stream piece by piece, and the loop works in a
real terminal (tmux: send-keys in, capture-pane out)."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_GUARD

REPO = Path(__file__).resolve().parents[1]


def test_answers_stream_piece_by_piece() -> None:
    from florist.data import Prompter, encode_prompt
    from florist.generation import Sampling, StreamPrinter, generate
    from florist.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    ids = encode_prompt({"messages": [{"role": "user", "content": "Name three colours."}]}, tok, Prompter())
    stream = io.StringIO()
    printer = StreamPrinter(tok, stream)
    (answer,) = generate(model, tok, [ids], Sampling(max_new_tokens=24), streamer=printer, progress=False)
    assert len(printer.pieces) > 3  # written as it came, not at the end
    assert stream.getvalue().strip() == answer and answer


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def _wait_for(session: str, predicate, what: str) -> str:
    """Poll the pane until ``predicate(screen)``; HANG_GUARD only guards against a hang."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session, "-S", "-200")
        if predicate(screen):
            return screen
        if "CHAT-EXIT=" in screen:  # the chat ended before showing it
            break
        time.sleep(0.2)
    raise AssertionError(f"the terminal never showed {what}:\n{screen}")


def test_chat_in_a_real_terminal(tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        message = "tmux is not installed (apt-get install tmux)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    session = f"florist-chat-{os.getpid()}"
    command = [sys.executable, "-m", "florist.cli", "chat", "smollm2-135m", "--max_new_tokens", "24"]
    shell = f"cd {shlex.quote(str(REPO))} && FLORIST_PROGRESS=0 {shlex.join(command)}; echo CHAT-EXIT=$?; sleep 600"
    _tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "40", shell)
    try:
        # (capture-pane drops trailing spaces: the prompt "you> " shows as "you>")
        _wait_for(session, lambda s: "you>" in s, "the first prompt")
        _tmux("send-keys", "-t", session, "What is the capital of France?", "Enter")
        screen = _wait_for(session, lambda s: s.count("you>") >= 2, "the answer and the next prompt")
        answer = screen.split("assistant> ", 1)[1].split("\n", 1)[0]
        assert "Paris" in answer, screen
        _tmux("send-keys", "-t", session, "clear", "Enter")
        _wait_for(session, lambda s: "(conversation cleared)" in s, "the cleared conversation")
        _tmux("send-keys", "-t", session, "exit", "Enter")
        _wait_for(session, lambda s: "CHAT-EXIT=0" in s, "a clean exit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
