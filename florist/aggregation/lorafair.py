"""LoRA-FAIR (arXiv 2411.14961): FedIT's factors plus a server-side correction of B.

The server forms FedIT's B̄ = Σ p_k s_k B_k (scalings folded) and Ā = Σ p_k A_k, and the exact
update ΔW = Σ p_k s_k B_k A_k, then finds the correction ΔB that brings (B̄ + ΔB) Ā close to ΔW
while keeping ΔB small. The paper writes this as min_ΔB S(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖ with a
similarity S and solves it by gradient steps. We take S as the squared Frobenius distance and
the regulariser squared,

    min_X ‖ΔW − X Ā‖_F² + λ' ‖X − B̄‖_F²,   X = B̄ + ΔB,

whose minimiser is closed-form: X (Ā Āᵀ + λ' I) = ΔW Āᵀ + λ' B̄. ΔW Āᵀ = Σ p_k s_k B_k (A_k Āᵀ)
needs only r × r products, so ΔW is never formed: O(K (m + n) r²) time, O((m + n) r) memory.
λ' = λ · tr(Ā Āᵀ) / r makes λ scale-free (λ = 0.01 by default; λ = 0 is the plain least
squares, which needs Ā of full row rank). Homogeneous ranks, as FedIT. Every client continues
from (B̄ + ΔB, Ā); the output keeps a common scaling s (X / s), or has scaling 1 if they differ.
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
from florist.aggregation.linalg import padded_average, to_cpu


def corrected_B(
    updates: Sequence[ClientUpdate],
    name: str,
    p: torch.Tensor,
    B_bar: torch.Tensor,
    A_bar: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """X = (ΔW Āᵀ + λ' B̄)(Ā Āᵀ + λ' I)⁻¹ in the latent space (B̄ with scalings folded in)."""
    dtype = A_bar.dtype
    target = torch.zeros_like(B_bar)  # ΔW Āᵀ, m × r
    for w, u in zip(p.tolist(), updates):
        f = u.modules[name]
        target += (w * f.scaling) * (to_cpu(f.B, dtype) @ (to_cpu(f.A, dtype) @ A_bar.T))
    gram = A_bar @ A_bar.T
    reg = lam * float(torch.trace(gram)) / gram.shape[0]
    lhs = gram + reg * torch.eye(gram.shape[0], dtype=dtype)
    rhs = target + reg * B_bar
    # X lhs = rhs, lhs symmetric: solve lhs Xᵀ = rhsᵀ.
    return torch.linalg.solve(lhs, rhs.T).T


@register
class LoRAFAIR(Aggregator):
    name = "lorafair"
    label = "LoRA-FAIR"
    supports_heterogeneous = False
    client_init = "shared"  # built on FedIT

    def __init__(self, dtype: torch.dtype = torch.float64, *, regularization: float = 0.01) -> None:
        super().__init__(dtype)
        if (
            isinstance(regularization, bool)
            or not isinstance(regularization, (int, float))
            or not regularization >= 0
        ):
            raise ValueError(
                f"LoRA-FAIR regularization (lambda) must be a number >= 0, got {regularization!r}"
            )
        self.regularization = float(regularization)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        p = client_weights(updates, self.dtype)
        adapter = {}
        for name in names:
            average = padded_average(updates, name, p, self.dtype)
            X = corrected_B(updates, name, p, average.B * average.scaling, average.A, self.regularization)
            adapter[name] = LoraFactors(A=average.A, B=X / average.scaling, scaling=average.scaling)
        return self.result(adapter, options={"regularization": self.regularization})
