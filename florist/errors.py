"""User-facing errors: one line on stderr and exit code 2, never a traceback wall."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class FloristError(Exception):
    """An error caused by the user's input or environment, reported in one line."""


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a CLI body; bad input (ValueError, FileNotFoundError, FloristError) exits with 2."""
    try:
        code = fn()
        return 0 if code is None else int(code)
    except (FloristError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("FLORIST_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"florist: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("florist: interrupted", file=sys.stderr)
        return 130
