"""User-facing errors: one line on stderr and exit code 2, never a traceback wall."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class FloristError(Exception):
    """An error caused by the user's input or environment, reported in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (temporary files removed)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a CLI body; bad input (ValueError, FileNotFoundError, FloristError) and a failing disk
    (no space, read-only: OSError) exit with 2 and one line. SIGTERM cleans up as Ctrl-C does."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(fn)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(fn: Callable[[], int | None]) -> int:
    try:
        code = fn()
        return 0 if code is None else int(code)
    except (FloristError, ValueError, OSError) as e:
        if os.environ.get("FLORIST_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"florist: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # pathlib's resolve() reports a symlink loop so (Python < 3.13); florist.io.resolve_path
        # names the setting, and this catches any path resolved elsewhere.
        if not str(e).startswith("Symlink loop") or os.environ.get("FLORIST_DEBUG"):
            raise
        print(
            f"florist: error: {str(e).splitlines()[0]} (a symlink that leads back to itself)", file=sys.stderr
        )
        return 2
    except Terminated:
        print("florist: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, as the shell reports a process it terminated
    except KeyboardInterrupt:
        print("florist: interrupted", file=sys.stderr)
        return 130
