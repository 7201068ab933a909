"""FLoRA: exact aggregation by stacking, no truncation.

B = [s_1 B_1 | ... | s_K B_K] and A = [p_1 A_1; ...; p_K A_K], so B A = sum_k p_k s_k B_k A_k
exactly, at rank R = sum_k r_k. Every client downloads the whole stack, merges it into its base
weights and starts the next round from a fresh LoRA. The output has scaling 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from florist.aggregation.base import (
    Aggregator,
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
    merges_into_base = True

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        adapter = {}
        for name in names:
            B, A = weighted_stack(updates, name, weights, self.dtype)
            adapter[name] = LoraFactors(A=A, B=B, scaling=1.0)
        return GlobalResult(
            method=self.name, merge=True, ranks={n: f.rank for n, f in adapter.items()}, adapter=adapter
        )
