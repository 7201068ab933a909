"""FLoRIST: exact stacking, SVD in the latent space, singular-value thresholding on energy.

Per module (paper, Section 3):
1. B_stack = [s_1 B_1 | ... | s_K B_K] (m x R), A_stack = [p_1 A_1; ...; p_K A_K] (R x n), so
   B_stack A_stack = sum_k p_k s_k B_k A_k exactly.
2. SVD of that product from the factors alone: QR (default) or thin SVDs of the two stacks and an
   SVD of the small R x R core (``linalg.product_svd``). The m x n update is never formed.
3. Keep the smallest p whose singular values hold a fraction tau of the energy sum sigma^2
   (``linalg.energy_rank``; tau = 1 keeps every numerically non-zero direction).
4. Broadcast B_g = U[:, :p] diag(sigma[:p]), A_g = Vh[:p] with scaling 1 to every client, which
   merges it into its base weights and starts the next round from a fresh LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist.aggregation.base import (
    Aggregator,
    BroadcastShape,
    ClientUpdate,
    GlobalResult,
    client_weights,
    register,
)
from florist.aggregation.linalg import (
    Decomposition,
    check_decomposition,
    energy_rank,
    product_svd,
    weighted_stack,
)


@register
class FLoRIST(Aggregator):
    name = "florist"
    label = "FLoRIST"
    merges_into_base = True
    options = ("threshold",)
    swept_option = "threshold"
    rank_from_weights = True

    @classmethod
    def broadcast_shape(cls, client_ranks: Sequence[int], kept_rank: int | None = None) -> BroadcastShape:
        if kept_rank is None:
            raise ValueError("florist's broadcast rank depends on the weights: pass florist_rank")
        return BroadcastShape(kept_rank, (kept_rank,) * len(client_ranks))

    @classmethod
    def describe(cls, options: dict[str, object] | None = None) -> str:
        tau = (options or {}).get("threshold")
        return cls.label if tau is None else f"{cls.label} τ={float(tau):.2f}"  # type: ignore[arg-type]

    def __init__(
        self,
        dtype: torch.dtype = torch.float64,
        *,
        threshold: float = 0.9,
        decomposition: Decomposition = "qr",
    ) -> None:
        super().__init__(dtype)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 < threshold <= 1.0
        ):
            raise ValueError(f"FLoRIST threshold (tau) must be a number in (0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.decomposition = check_decomposition(decomposition)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        adapter, singular_values = {}, {}
        for name in names:
            B, A = weighted_stack(updates, name, weights, self.dtype)
            svd = product_svd(B, A, self.decomposition)
            rank = energy_rank(svd.S, self.threshold, (B.shape[0], A.shape[1]))
            adapter[name] = svd.factors(rank)
            singular_values[name] = svd.S
        options = {"threshold": self.threshold, "decomposition": self.decomposition}
        return self.result(adapter, singular_values=singular_values, options=options)

    def __repr__(self) -> str:
        return (
            f"FLoRIST(dtype={self.dtype}, threshold={self.threshold}, decomposition={self.decomposition!r})"
        )
