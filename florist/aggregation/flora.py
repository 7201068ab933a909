"""FLoRA: exact aggregation by stacking, no truncation.

B = [s_1 B_1 | ... | s_K B_K] and A = [p_1 A_1; ...; p_K A_K], so B A = sum_k p_k s_k B_k A_k
exactly, at rank R = sum_k r_k. Every client downloads the whole stack, merges it into its base
weights and starts the next round from a fresh LoRA. The output has scaling 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from florist.aggregation.base import (
    Aggregator,
    BroadcastShape,
    ClientUpdate,
    GlobalResult,
    LoraFactors,
    client_weights,
    register,
)
from florist.aggregation.linalg import weighted_stack


@register
class FLoRA(Aggregator):
    name = "flora"
    label = "FLoRA"
    merges_into_base = True

    @classmethod
    def broadcast_shape(cls, client_ranks: Sequence[int], kept_rank: int | None = None) -> BroadcastShape:
        total = sum(client_ranks)  # the whole stack, to every client
        return BroadcastShape(total, (total,) * len(client_ranks))

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        adapter = {}
        for name in names:
            B, A = weighted_stack(updates, name, weights, self.dtype)
            adapter[name] = LoraFactors(A=A, B=B, scaling=1.0)
        return self.result(adapter)
