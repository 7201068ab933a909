"""The server's memory during FLoRIST aggregation is O(sum (m + n) r), never O(m n).

Each measurement runs in a fresh process: it builds the clients' uploads, records its resident
set (VmRSS), aggregates, and reads the resident high-water mark (VmHWM) from /proc/self/status.
torch's allocations bypass tracemalloc, so RSS is the honest measure. The difference is the
aggregation's extra peak. At Llama-7B shapes (4096 x 4096, 8 clients at r = 16) one m x n
float64 buffer is 134 MB; the latent route must stay far below it and grow linearly with
m + n, while the dense route (form B @ A, then SVD) is shown to trip the same bound, so the
test would catch an m x n buffer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2

CHILD = r"""
import gc, json, sys
import torch
from florist.aggregation import ClientUpdate, LoraFactors, get_aggregator

torch.set_num_threads(1)  # fewer per-thread LAPACK buffers: a steadier measurement


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise SystemExit(f"no {key} in /proc/self/status")


def uploads(m, n, clients, rank, modules):
    g = torch.Generator().manual_seed(0)
    return [
        ClientUpdate(f"c{k}", 10 + k, {
            f"model.layers.{i}.proj": LoraFactors(
                torch.randn(rank, n, generator=g), torch.randn(m, rank, generator=g), 2.0)
            for i in range(modules)
        })
        for k in range(clients)
    ]


m, n, clients, rank, modules = map(int, sys.argv[1:6])
aggregator = get_aggregator("florist", threshold=0.9, decomposition=sys.argv[6])
aggregator.aggregate(uploads(32, 16, 2, 2, 1))  # load LAPACK before the baseline
inputs = uploads(m, n, clients, rank, modules)
gc.collect()
rss = status("VmRSS")
result = aggregator.aggregate(inputs)
peak = status("VmHWM")
kept = sum(f.A.nbytes + f.B.nbytes for f in result.adapter.values())
print(json.dumps({"extra": peak - rss, "result_bytes": kept, "ranks": result.ranks}))
"""


def extra_peak(m: int, n: int, *, clients: int, rank: int, modules: int, decomposition: str = "qr") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [str(x) for x in (m, n, clients, rank, modules, decomposition)]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def working_bound(m: int, n: int, R: int) -> int:
    """Bytes the aggregation of one module may hold beyond its result: a handful of (m + n) x R
    float64 arrays (the stacks, their QR factors, the rotated directions) plus allocator slack."""
    return 6 * (m + n) * R * 8 + 8 * MiB


pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def test_florist_aggregation_memory_is_linear_in_m_plus_n_at_llama_7b_shapes() -> None:
    clients, r, modules = 8, 16, 2
    R = clients * r
    small = extra_peak(4096, 4096, clients=clients, rank=r, modules=modules)
    big = extra_peak(8192, 8192, clients=clients, rank=r, modules=modules)
    dense_buffer = 4096 * 4096 * 8  # one m x n float64 matrix: 134 MB
    # Far below a single m x n buffer, with two modules (their results kept) counted in.
    assert small["extra"] < 0.5 * dense_buffer, small
    for shape, got in ((4096, small), (8192, big)):
        assert got["extra"] - got["result_bytes"] <= working_bound(shape, shape, R), (shape, got)
    # Doubling m and n doubles (m + n) R but quadruples m n: the peak must follow the former.
    assert big["extra"] < 3.0 * small["extra"], (small, big)
    assert big["extra"] < 0.25 * (8192 * 8192 * 8), big  # a quarter of its m x n buffer


def test_the_dense_route_would_fail_the_same_bound() -> None:
    """The harness sees an m x n buffer: the dense SVD (FlexLoRA's published route) exceeds the
    bound the latent route meets on the very same uploads."""
    m, n, clients, r = 4096, 512, 2, 16
    bound = working_bound(m, n, clients * r)
    latent = extra_peak(m, n, clients=clients, rank=r, modules=1)
    dense = extra_peak(m, n, clients=clients, rank=r, modules=1, decomposition="dense")
    assert latent["ranks"] == dense["ranks"]
    assert latent["extra"] - latent["result_bytes"] <= bound, latent
    assert dense["extra"] >= m * n * 8, dense  # at least the product B @ A itself
    assert dense["extra"] - dense["result_bytes"] > bound, dense
