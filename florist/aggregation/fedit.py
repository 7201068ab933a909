"""FedIT: FedAvg of the two LoRA factors separately (homogeneous ranks only).

B = sum_k p_k B_k and A = sum_k p_k A_k, so B A != sum_k p_k B_k A_k (cross terms): the method is
not exact, which is the point the other methods improve on. Clients continue from (B, A).
If all clients share one scaling it is kept; otherwise each s_k is folded into B_k and the output
has scaling 1 (see ``linalg.fold_factors``).
"""

from __future__ import annotations

from collections.abc import Sequence

from florist.aggregation.base import (
    Aggregator,
    ClientUpdate,
    GlobalResult,
    client_weights,
    register,
)
from florist.aggregation.linalg import padded_average


@register
class FedIT(Aggregator):
    name = "fedit"
    label = "FedIT"
    supports_heterogeneous = False
    client_init = "shared"  # FedAvg: every client starts from the one global model
    linear_in_uploads = True

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        adapter = {name: padded_average(updates, name, weights, self.dtype) for name in names}
        return self.result(adapter)
