"""Adapter algebra on plain tensors: client ids, stacking, truncation, padding, local factors.

A leaf module: the round engine, the personalised evaluation, the Flower apps and the CLIs all
use these, and it imports nothing of theirs.
"""

from __future__ import annotations

import torch

from florist.aggregation.base import Adapter, Factor, LoraFactors


def client_id(index: int) -> str:
    return f"client_{index}"


def total_rank(adapter: Adapter) -> int:
    return sum(f.rank for f in adapter.values())


def min_rank(adapter: Adapter) -> int:
    return min(f.rank for f in adapter.values())


def largest(adapters: dict[str, Adapter]) -> Adapter:
    """The adapter with the largest total rank (the first such one on a tie)."""
    return max(adapters.values(), key=total_rank)


def to_cpu(adapter: Adapter, dtype: torch.dtype | None = None) -> Adapter:
    """``adapter`` on the CPU (as ``dtype``, if given), detached."""
    return {
        n: LoraFactors(A=f.A.detach().to("cpu", dtype), B=f.B.detach().to("cpu", dtype), scaling=f.scaling)
        for n, f in adapter.items()
    }


def stack_adapters(adapters: list[Adapter]) -> Adapter:
    """One adapter whose update is the sum of all: B = [s_1 B_1 | ...], A = [A_1; ...], scaling 1."""
    stacked: Adapter = {}
    for name in adapters[0]:
        Bs = [a[name].B * a[name].scaling for a in adapters]
        stacked[name] = LoraFactors(
            A=torch.cat([a[name].A for a in adapters], dim=0), B=torch.cat(Bs, dim=1), scaling=1.0
        )
    return stacked


def truncate_adapter(adapter: Adapter, rank: int) -> Adapter:
    """The first ``rank`` components of every module (zero-padding and FlexLoRA clients)."""
    return {n: LoraFactors(A=f.A[:rank], B=f.B[:, :rank], scaling=f.scaling) for n, f in adapter.items()}


def pad_adapter(adapter: Adapter, fresh: Adapter) -> Adapter:
    """Grow ``adapter`` to ``fresh``'s rank: fresh A rows and zero B columns, same update."""
    padded: Adapter = {}
    for n, f in adapter.items():
        have, want = f.rank, fresh[n].rank
        A = torch.cat([f.A, fresh[n].A[have:want].to(f.A.dtype)], dim=0)
        B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], want - have)], dim=1)
        padded[n] = LoraFactors(A=A, B=B, scaling=f.scaling)
    return padded


def zeros_adapter(shapes: dict[str, tuple[int, int]], rank: int) -> Adapter:
    """A = 0 and B = 0 at ``rank`` for every module of ``shapes`` (out, in)."""
    return {n: LoraFactors(A=torch.zeros(rank, i), B=torch.zeros(o, rank)) for n, (o, i) in shapes.items()}


def with_local_factors(received: Adapter, own: Adapter | None, factors: tuple[Factor, ...]) -> Adapter:
    """``received`` with ``factors`` replaced by the client's own (zeros when it has none yet).

    The scaling goes with B: the client's own B keeps the client's own scaling.
    """
    if not factors:
        return received
    out: Adapter = {}
    for name, f in received.items():
        mine = own[name] if own is not None else None
        A = mine.A if mine is not None and "A" in factors else f.A
        B = (mine.B if mine is not None else torch.zeros_like(f.B)) if "B" in factors else f.B
        scaling = mine.scaling if mine is not None and "B" in factors else f.scaling
        out[name] = LoraFactors(A=A, B=B, scaling=scaling)
    return out
