"""`import florist` bounds the caches of compiled bf16 kernels (florist.KERNEL_CACHE_CAPACITY):
oneDNN's primitive cache and PyTorch's ideep cache above it. Without the bound each kept up to 1024
shapes' kernels and RSS grew round after round (docs/benchmarks.md, "Many clients stay cheap").

Each check runs in a fresh process, because the libraries read the capacity once, at their first
bf16 matmul. oneDNN's verbose log names every primitive it compiles ("create:cache_miss"), which
shows its bound at work; ideep's is checked as the setting the process sees."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import HANG_GUARD

import florist

CAPACITY = int(florist.KERNEL_CACHE_CAPACITY["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])

# florist first, as every entry point imports it; then CAPACITY + 2 matmul shapes, then the first again.
CHILD = f"""
import os, florist, torch
print("CAPACITIES", os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"], flush=True)
x = torch.randn(64, 256, dtype=torch.bfloat16)
for n in [*range(1, {CAPACITY} + 3), 1]:
    x @ torch.randn(256, 16 * n, dtype=torch.bfloat16)
"""


def run(**env: str) -> tuple[list[str], int]:
    """The capacities the child saw, and how many matmul primitives oneDNN compiled."""
    base = {k: v for k, v in os.environ.items() if k not in florist.KERNEL_CACHE_CAPACITY}
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**base, "ONEDNN_VERBOSE": "2", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD,
    )
    lines = done.stdout.splitlines()
    seen = next(line.split()[1:] for line in lines if line.startswith("CAPACITIES"))
    return seen, sum("create:cache_miss" in line and ",matmul," in line for line in lines)


def test_florist_bounds_the_kernel_caches_and_a_users_setting_wins() -> None:
    seen, compiled = run()
    assert seen == [str(CAPACITY)] * 2
    if compiled == 0:
        pytest.skip("torch does not run bf16 matmuls through oneDNN on this CPU: no cache to bound")
    # The first shape was evicted from oneDNN's cache by the CAPACITY + 1 after it: compiled again.
    assert compiled == CAPACITY + 3
    # With the libraries' own capacity (the user's choice here) it is still cached.
    seen, compiled = run(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert seen == ["1024", "1024"]
    assert compiled == CAPACITY + 2
