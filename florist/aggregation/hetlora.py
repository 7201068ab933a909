"""HetLoRA (arXiv 2401.06432): zero-padding with sparsity weights, truncated per client.

Client k's factors are zero-padded to r_max and averaged with the sparsity-weighted rule
S_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F, as published: clients whose update is larger weigh
more, and the data sizes n_k do not enter. ``data_weights=True`` uses p_k S_k instead
(renormalised), a variant the paper does not evaluate. The norms come from the r × r Gram
matrices, ‖B A‖_F² = tr((BᵀB)(AAᵀ)), never from the m × n product. Client k continues from the
first r_k directions (A[:r_k], B[:, :r_k]), as in zero-padding and FlexLoRA. If every update is
zero the weights fall back to p_k. Scaling is handled as in zero-padding.

The clients' rank self-pruning regulariser of the paper is not part of the aggregation (it changes
local training) and is not implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist.aggregation.base import (
    Aggregator,
    ClientUpdate,
    GlobalResult,
    LoraFactors,
    client_weights,
    register,
)
from florist.aggregation.linalg import leading, padded_average, share_by_rank, to_cpu


def update_norm(f: LoraFactors, dtype: torch.dtype) -> float:
    """‖s B A‖_F from the r × r Gram matrices."""
    A, B = to_cpu(f.A, dtype), to_cpu(f.B, dtype)
    return abs(f.scaling) * float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt())


@register
class HetLoRA(Aggregator):
    name = "hetlora"
    label = "HetLoRA"
    sends_client_rank = True  # client k gets its own first r_k directions
    client_init = "shared"  # the server's global LoRA at r_max, truncated per client

    def __init__(self, dtype: torch.dtype = torch.float64, *, data_weights: bool = False) -> None:
        super().__init__(dtype)
        if not isinstance(data_weights, bool):
            raise ValueError(f"HetLoRA data_weights must be True or False, got {data_weights!r}")
        self.data_weights = data_weights

    def weights(self, updates: Sequence[ClientUpdate], name: str) -> list[float]:
        p = client_weights(updates, torch.float64).tolist()
        S = [update_norm(u.modules[name], self.dtype) for u in updates]
        if self.data_weights:
            S = [s * w for s, w in zip(S, p)]
        total = sum(S)
        return p if total == 0 else [s / total for s in S]

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        average = {
            name: padded_average(
                updates, name, torch.tensor(self.weights(updates, name), dtype=self.dtype), self.dtype
            )
            for name in names
        }
        adapter, per_client, ranks = share_by_rank(
            updates, names, lambda name, rank: leading(average[name], rank)
        )
        options = {"data_weights": self.data_weights}
        return self.result(adapter, ranks=ranks, per_client=per_client, options=options)
