"""When florist draws tqdm bars: one rule for training, evaluation, tokenising and sweeps.

``FLORIST_PROGRESS=0`` turns every bar off (logs, CI, Flower nodes); otherwise tqdm decides,
which means a bar on a terminal and none in a redirected log. A caller can still force a bar
on or off with ``progress=True`` / ``False``.
"""

from __future__ import annotations

import os


def bar_disabled(progress: bool | None = None) -> bool | None:
    """tqdm's ``disable`` argument for a florist bar (None: tqdm's own terminal-only choice)."""
    if progress is not None:
        return not progress
    return True if os.environ.get("FLORIST_PROGRESS") == "0" else None
