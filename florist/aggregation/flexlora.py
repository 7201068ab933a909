"""FlexLoRA: SVD of the exact aggregate, truncated at each client's own rank.

The server forms dW = sum_k p_k s_k B_k A_k and takes its SVD; client k receives the best rank-r_k
approximation B = U[:, :r_k] diag(sigma[:r_k]), A = Vh[:r_k] (scaling 1) and continues training
from it; nothing is merged. As published the SVD is dense ("dense", O(m n min(m, n)) per module);
``decomposition="qr"`` or ``"svd"`` gives the same factors (up to rounding) from the latent SVD of
the stacked factors without forming dW. The singular values are recorded per module (at most
R = sum_k r_k of them: the rest are zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist.aggregation.base import (
    Aggregator,
    ClientUpdate,
    GlobalResult,
    client_weights,
    register,
)
from florist.aggregation.linalg import (
    Decomposition,
    check_decomposition,
    product_svd,
    share_by_rank,
    weighted_stack,
)


@register
class FlexLoRA(Aggregator):
    name = "flexlora"
    label = "FlexLoRA"
    sends_client_rank = True  # client k gets its own first r_k directions

    def __init__(self, dtype: torch.dtype = torch.float64, *, decomposition: Decomposition = "dense") -> None:
        super().__init__(dtype)
        self.decomposition = check_decomposition(decomposition)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        svds = {}
        for name in names:
            B, A = weighted_stack(updates, name, weights, self.dtype)
            svds[name] = product_svd(B, A, self.decomposition)
        adapter, per_client, ranks = share_by_rank(
            updates, names, lambda name, rank: svds[name].factors(rank)
        )
        singular_values = {name: svd.S for name, svd in svds.items()}
        options = {"decomposition": self.decomposition}
        return self.result(
            adapter, ranks=ranks, per_client=per_client, singular_values=singular_values, options=options
        )
