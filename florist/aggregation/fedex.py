"""FedEx-LoRA (arXiv 2410.09432): FedIT plus the exact residual, folded into the base weights.

The server averages the factors as FedIT does, B̄ = Σ p_k B_k and Ā = Σ p_k A_k, and clients
continue training from (B̄, Ā). What FedIT loses is the residual

    Σ_k p_k s_k B_k A_k − s B̄ Ā,

which every client folds into its frozen base weights, so base + s B̄ Ā moves by exactly
Σ p_k s_k B_k A_k. The residual has rank at most (K + 1) r and is sent factored, never m × n:
B_res = [s_1 B_1 | … | s_K B_K | −s B̄] and A_res = [p_1 A_1; …; p_K A_K; Ā] (scaling 1).
It is accounted as downloaded with both factors (``GlobalResult.base_update``). Homogeneous ranks
only: the paper gives no rule for averaging factors of different ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist.aggregation.base import (
    Aggregator,
    BroadcastShape,
    ClientUpdate,
    GlobalResult,
    LoraFactors,
    client_weights,
    register,
)
from florist.aggregation.linalg import padded_average, weighted_stack


@register
class FedEx(Aggregator):
    name = "fedex"
    label = "FedEx-LoRA"
    supports_heterogeneous = False
    client_init = "shared"  # built on FedIT: every client starts from the one global model

    @classmethod
    def broadcast_shape(cls, client_ranks: Sequence[int], kept_rank: int | None = None) -> BroadcastShape:
        r, k = max(client_ranks), len(client_ranks)
        return BroadcastShape(r, (r,) * k, folded=(k + 1) * r)  # (B̄, Ā) and the residual

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        adapter, residual = {}, {}
        for name in names:
            average = padded_average(updates, name, weights, self.dtype)
            B, A = weighted_stack(updates, name, weights, self.dtype)
            residual[name] = LoraFactors(
                A=torch.cat([A, average.A], dim=0), B=torch.cat([B, -average.scaling * average.B], dim=1)
            )
            adapter[name] = average
        return self.result(adapter, base_update=residual)
