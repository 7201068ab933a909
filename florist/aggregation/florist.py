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

Modules are independent: they run side by side, each single-threaded (``linalg.map_modules``), so
the result does not depend on the thread count. In float32 (``dtype=torch.float32``) a module's
result is kept only when ``linalg.float32_error_bound`` certifies that its kept rank is float64's;
the others are recomputed in float64 (``options["float64_modules"]`` names them).
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
from florist.aggregation.linalg import (
    Decomposition,
    certified_energy_rank,
    check_decomposition,
    energy_rank,
    float32_error_bound,
    map_modules,
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
        workers: int | None = None,
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
        # Modules aggregated side by side (linalg.map_modules; None: torch's thread count).
        self.workers = workers

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        float64_weights = client_weights(updates, torch.float64)

        def module(name: str) -> tuple[LoraFactors, torch.Tensor, bool]:
            B, A = weighted_stack(updates, name, weights, self.dtype)
            svd = product_svd(B, A, self.decomposition)
            if self.dtype == torch.float64:
                return svd.factors(energy_rank(svd.S, self.threshold, (B.shape[0], A.shape[1]))), svd.S, False
            # float32: keep its result only when its error bound leaves the kept rank certain,
            # so the rank is always float64's; otherwise redo this module in float64.
            rank = certified_energy_rank(svd.S, self.threshold, float32_error_bound(B, A))
            if rank is not None:
                return svd.factors(rank), svd.S, False
            B, A = weighted_stack(updates, name, float64_weights, torch.float64)
            svd = product_svd(B, A, self.decomposition)
            f = svd.factors(energy_rank(svd.S, self.threshold, (B.shape[0], A.shape[1])))
            return LoraFactors(A=f.A.float(), B=f.B.float(), scaling=f.scaling), svd.S.float(), True

        done = map_modules(module, names, self.workers)
        adapter = {name: f for name, (f, _, _) in zip(names, done)}
        singular_values = {name: S for name, (_, S, _) in zip(names, done)}
        options: dict[str, object] = {"threshold": self.threshold, "decomposition": self.decomposition}
        if self.dtype == torch.float32:  # the modules whose cut-off float32 could not certify
            options["float64_modules"] = [name for name, (_, _, redone) in zip(names, done) if redone]
        return self.result(adapter, singular_values=singular_values, options=options)
