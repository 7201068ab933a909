"""The linear algebra the aggregators share.

* weighted stacks and zero-padded averages of the clients' effective updates,
* the SVD of a product ``B @ A`` computed from the factors alone (the "latent" SVD: QR or thin
  SVD of each factor, then an SVD of a small R x R core; the dense m x n matrix is never formed),
* the same SVD the dense way (form ``B @ A``, then SVD) as FlexLoRA publishes it,
* the sigma^2 energy cut-off of FLoRIST, and a deterministic sign convention for SVD outputs.

Everything runs on the CPU in the dtype the caller asks for (float64 or float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from florist.aggregation.base import Adapter, ClientUpdate, LoraFactors

T = TypeVar("T")
Decomposition = Literal["qr", "svd", "dense"]
DECOMPOSITIONS: tuple[str, ...] = ("qr", "svd", "dense")

# Relative slack on the energy ratio so that, e.g., a cumulative ratio of 0.8999999999999999
# still counts as reaching tau = 0.9 (float64 rounding of the cumulative sum).
ENERGY_RTOL = 1e-12


def check_decomposition(decomposition: str) -> str:
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {decomposition!r}")
    return decomposition


def to_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=dtype)


def _single_threaded() -> None:
    torch.set_num_threads(1)  # this worker thread's own OpenMP and MKL settings


def map_modules(fn: Callable[[str], T], names: Sequence[str], workers: int | None = None) -> list[T]:
    """``[fn(name) for name in names]``, the modules spread over ``workers`` threads (default: torch's
    thread count), each running its LAPACK calls single-threaded.

    A module's QR, SVD and rotations are tall-skinny LAPACK calls that MKL parallelises poorly
    (two threads gained ~1.3x on one module); whole modules side by side use every core. Every
    module is computed single-threaded whatever the thread count, so the result does not depend
    on it (MKL's multi-threaded geqrf rounds differently from its single-threaded one).
    ``workers=1`` runs in the calling thread as it is set (the sequential route, for comparison).
    """
    threads = torch.get_num_threads()
    workers = threads if workers is None else workers
    if workers <= 1 or (threads == 1 and len(names) <= 1):
        return [fn(name) for name in names]
    try:
        with ThreadPoolExecutor(min(workers, len(names)), initializer=_single_threaded) as pool:
            return list(pool.map(fn, names))
    finally:
        # torch keeps the last set_num_threads as the default for threads it meets later: restore it.
        torch.set_num_threads(threads)


# --- stacks and averages ---------------------------------------------------------------------


def fold_factors(updates: Sequence[ClientUpdate], name: str) -> tuple[list[float], float]:
    """Per-client factors to multiply into B, and the scaling of the aggregated output.

    If every client uses the same scaling s for ``name`` (the paper: alpha = 2r, so s = 2), the
    average keeps s and nothing is folded, so a client continues with its own hyperparameters.
    Otherwise each s_k is folded into B_k and the output has scaling 1. Either way the effective
    update of the output is the same.
    """
    scalings = [float(u.modules[name].scaling) for u in updates]
    if all(s == scalings[0] for s in scalings):
        return [1.0] * len(updates), scalings[0]
    return scalings, 1.0


def weighted_stack(
    updates: Sequence[ClientUpdate], name: str, weights: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """B_stack = [s_1 B_1 | ... | s_K B_K] (m x R) and A_stack = [p_1 A_1; ...; p_K A_K] (R x n).

    Their product is exactly sum_k p_k s_k B_k A_k, with R = sum_k r_k.
    """
    first = updates[0].modules[name]
    R = sum(u.modules[name].rank for u in updates)
    B = torch.empty(first.out_features, R, dtype=dtype)
    A = torch.empty(R, first.in_features, dtype=dtype)
    offset = 0
    for k, u in enumerate(updates):
        f = u.modules[name]
        rows = slice(offset, offset + f.rank)
        B[:, rows].copy_(f.B.detach()).mul_(f.scaling)  # copy_ casts and moves to the CPU
        A[rows].copy_(f.A.detach()).mul_(weights[k])
        offset += f.rank
    return B, A


def padded_weighted_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], rank: int, dim: int
) -> torch.Tensor:
    """sum_k w_k * pad(t_k), each t_k zero-padded along ``dim`` to ``rank``."""
    shape = list(tensors[0].shape)
    shape[dim] = rank
    out = torch.zeros(shape, dtype=tensors[0].dtype)
    for t, w in zip(tensors, weights):
        out.narrow(dim, 0, t.shape[dim]).add_(t, alpha=float(w))
    return out


def padded_average(
    updates: Sequence[ClientUpdate], name: str, weights: torch.Tensor, dtype: torch.dtype
) -> LoraFactors:
    """FedIT's average at r_max: B = sum_k p_k pad(B_k), A = sum_k p_k pad(A_k) (zero-padding)."""
    folds, scaling = fold_factors(updates, name)
    rank = max(u.modules[name].rank for u in updates)
    p = weights.tolist()
    B = padded_weighted_sum(
        [to_cpu(u.modules[name].B, dtype) for u in updates], [w * c for w, c in zip(p, folds)], rank, 1
    )
    A = padded_weighted_sum([to_cpu(u.modules[name].A, dtype) for u in updates], p, rank, 0)
    return LoraFactors(A=A, B=B, scaling=scaling)


def leading(factors: LoraFactors, rank: int) -> LoraFactors:
    """The first ``rank`` directions: A[:rank], B[:, :rank] (how a rank-r_k client takes its share)."""
    return LoraFactors(A=factors.A[:rank].clone(), B=factors.B[:, :rank].clone(), scaling=factors.scaling)


def share_by_rank(
    updates: Sequence[ClientUpdate], names: Sequence[str], share: Callable[[str, int], LoraFactors]
) -> tuple[Adapter | None, dict[str, Adapter] | None, dict[str, int]]:
    """Give client k ``share(name, r_k)`` for every module (zero-padding, FFA, FlexLoRA).

    Returns ``(adapter, per_client, ranks)``: one shared adapter when every client has the same
    ranks (everyone receives the same thing), otherwise one adapter per client id. ``ranks`` is
    the largest client rank per module, whose share is the full global adapter.
    """
    cache: dict[tuple[str, int], LoraFactors] = {}
    per_client: dict[str, Adapter] = {}
    for u in updates:
        per_client[u.client_id] = {}
        for name in names:
            key = (name, u.modules[name].rank)
            if key not in cache:
                cache[key] = share(*key)
            per_client[u.client_id][name] = cache[key]
    ranks = {name: max(u.modules[name].rank for u in updates) for name in names}
    if len(cache) == len(names):  # one rank per module: a single broadcast
        return per_client[updates[0].client_id], None, ranks
    return None, per_client, ranks


# --- SVD of a product ------------------------------------------------------------------------


def fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-|.| entry of every column of U positive, flipping the matching row of Vh.

    An SVD is unique only up to such sign flips, which LAPACK picks arbitrarily; fixing them
    makes the broadcast adapter a function of the update alone.
    """
    if U.shape[1] == 0:
        return U, Vh
    signs = sign_convention(U)
    return U * signs, Vh * signs[:, None]


def sign_convention(U: torch.Tensor) -> torch.Tensor:
    """Per column of U, the sign (+1 or -1) that makes its largest-|.| entry positive."""
    if U.shape[1] == 0:
        return U.new_ones(0)
    rows = U.abs().argmax(dim=0)
    signs = torch.sign(U[rows, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return signs


def _rotate(basis: torch.Tensor, tau: torch.Tensor | None, core: torch.Tensor | None, k: int) -> torch.Tensor:
    """basis @ core[:, :k]: the first k singular vectors in the original space."""
    if core is None:
        return basis[:, :k]
    if tau is None:
        return basis @ core[:, :k]
    # basis holds Householder reflectors (geqrf): apply Q without ever forming it.
    padded = basis.new_zeros(basis.shape[0], k)
    padded[: core.shape[0]] = core[:, :k]
    return torch.ormqr(basis, tau, padded)


@dataclass(frozen=True)
class ProductSVD:
    """The thin SVD of a product B @ A, kept factored until the rank is chosen.

    ``B @ A = U diag(S) V^T`` with ``U = left @ core_U`` and ``V = right @ core_V``. ``left`` and
    ``right`` are orthonormal bases, or packed Householder reflectors when ``left_tau`` and
    ``right_tau`` are set (QR route); a ``None`` core means the identity (dense route). Only the
    kept directions are rotated back, which saves the work of rotating those thrown away.
    """

    S: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    core_U: torch.Tensor | None = None
    core_V: torch.Tensor | None = None
    left_tau: torch.Tensor | None = None
    right_tau: torch.Tensor | None = None

    def factors(self, rank: int) -> LoraFactors:
        """The best rank-``rank`` approximation: B = U_r diag(S_r), A = V_r^T, scaling 1.

        Signs follow ``fix_signs``. When fewer than ``rank`` directions exist (rank > min(m, n)),
        the factors are zero-padded so that the adapter keeps the requested rank.
        """
        k = min(rank, self.S.shape[0])
        U = _rotate(self.left, self.left_tau, self.core_U, k)
        V = _rotate(self.right, self.right_tau, self.core_V, k)
        signs = sign_convention(U)
        # One pass per factor, written straight into the (row-major) outputs; (U * sign) * S and
        # U * (sign * S) are equal bit for bit, a sign flip being exact.
        B = U.new_empty(U.shape[0], rank)
        A = V.new_empty(rank, V.shape[0])
        torch.mul(U, signs * self.S[:k], out=B[:, :k])
        torch.mul(V.T, signs[:, None], out=A[:k])
        if k < rank:
            B[:, k:] = 0
            A[k:] = 0
        return LoraFactors(A=A, B=B, scaling=1.0)


def product_svd(B: torch.Tensor, A: torch.Tensor, decomposition: Decomposition = "qr") -> ProductSVD:
    """Thin SVD of the product ``B @ A`` (B: m x R, A: R x n).

    "qr" and "svd" never form the m x n product: factor each side (B = Q_B R_B and A^T = Q_A R_A,
    or thin SVDs), take the SVD of the small core (R_B R_A^T, or S_B V_B^T U_A S_A) and rotate
    back. Time O((m + n) R^2 + R^3), memory O((m + n) R). "dense" forms B @ A and takes its SVD,
    O(m n min(m, n)) time and O(m n) memory, as FlexLoRA is published; it is the reference the
    latent routes are tested against. Either way there are min(m, n, R) directions.
    """
    check_decomposition(decomposition)
    if decomposition == "dense":
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        k = min(S.shape[0], B.shape[1])  # at most R directions are non-zero
        return ProductSVD(S=S[:k], left=U[:, :k], right=Vh[:k].T)
    if decomposition == "qr":
        left, left_tau = torch.geqrf(B)  # B = Q_B R_B, Q_B kept as reflectors
        right, right_tau = torch.geqrf(A.T)  # A^T = Q_A R_A
        core = left[: min(B.shape)].triu() @ right[: min(A.shape)].triu().T
    else:
        U_B, S_B, Vh_B = torch.linalg.svd(B, full_matrices=False)
        U_A, S_A, Vh_A = torch.linalg.svd(A, full_matrices=False)
        left, right, left_tau, right_tau = U_B, Vh_A.T, None, None
        core = (S_B[:, None] * (Vh_B @ U_A)) * S_A[None, :]
    core_U, S, core_Vh = torch.linalg.svd(core, full_matrices=False)
    return ProductSVD(S, left, right, core_U, core_Vh.T, left_tau, right_tau)


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Directions above the usual numerical-rank tolerance sigma_max * max(m, n) * eps."""
    if S.numel() == 0:
        return 0
    tol = float(S[0]) * max(shape) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


# The float32 route's error bound, (ROUNDING + DECOMPOSITION sqrt(R)) u32 ||B||_F ||A||_F
# (float32_error_bound); tests/test_speed_paths.py checks it against float64 dense SVDs.
FLOAT32_ROUNDING, FLOAT32_DECOMPOSITION = 4.0, 4.0


def float32_error_bound(B: torch.Tensor, A: torch.Tensor) -> float:
    """eps such that FLoRIST's float32 route computes the SVD of ``B @ A + E``, ||E||_F <= eps,
    where ``B @ A`` is the exact weighted sum of the clients' float32 uploads (what float64 computes).

    eps = (4 + 4 sqrt(R)) u32 ||B||_F ||A||_F, u32 = 2^-24. The first term covers rounding each
    element once: the scaled stacks (s_k B_k, p_k A_k) going in and the two factors coming out
    (at most about 3.5 u32 ||B||_F ||A||_F together). The second covers the QR, core SVD and
    rotations: worst-case analyses of Householder QR grow with m R, but rounding errors add up
    like a random walk (Higham and Mary, 2019); observed below 0.1 sqrt(R) u32 ||B||_F ||A||_F on
    Llama-7B shapes. Each singular value is then within eps of the exact one (Weyl), and the
    rank-p truncation within 2 eps of the best rank-p approximation's error (Mirsky).
    """
    u = torch.finfo(torch.float32).eps / 2
    norms = 1.0
    for t in (B, A):
        norm = float(torch.linalg.vector_norm(t))
        if not math.isfinite(norm):  # the sum of squares left float32: take the slower route
            norm = float(torch.linalg.vector_norm(t, dtype=torch.float64))
        norms *= norm
    return (FLOAT32_ROUNDING + FLOAT32_DECOMPOSITION * math.sqrt(B.shape[1])) * u * norms


def certified_energy_rank(S: torch.Tensor, threshold: float, error: float) -> int | None:
    """The rank ``energy_rank`` gives the exact singular values, when every entry of ``S`` is
    within ``error`` of them; None when ``error`` leaves the cut-off in doubt (or tau = 1, whose
    numerical rank is decided at the level of rounding itself).

    Each cumulative energy ratio is bounded from below (sigma_i - error for the kept, + error for
    the rest) and from above; p is certified when the bound for p directions reaches tau and that
    for p - 1 stays below tau by more than float64's own slack (``ENERGY_RTOL``).
    """
    if threshold >= 1.0 or S.numel() == 0:
        return None
    s = S.to(torch.float64)
    lo, hi = (s - error).clamp(min=0.0) ** 2, (s + error) ** 2
    head_lo, head_hi = torch.cumsum(lo, 0), torch.cumsum(hi, 0)
    tail_lo = torch.flip(torch.cumsum(torch.flip(lo, (0,)), 0), (0,))[1:]  # sum over i > k
    tail_hi = torch.flip(torch.cumsum(torch.flip(hi, (0,)), 0), (0,))[1:]
    tail_lo, tail_hi = torch.cat([tail_lo, s.new_zeros(1)]), torch.cat([tail_hi, s.new_zeros(1)])
    ratio_lo = head_lo / (head_lo + tail_hi)
    ratio_hi = head_hi / (head_hi + tail_lo)
    reached = torch.nonzero(ratio_lo >= threshold)  # NaN (all zero) never reaches it
    if not reached.numel():
        return None
    p = int(reached[0]) + 1
    if p > 1 and not float(ratio_hi[p - 2]) < threshold - 2 * ENERGY_RTOL:
        return None
    return p


def energy_rank(S: torch.Tensor, threshold: float, shape: tuple[int, int]) -> int:
    """FLoRIST's global rank p = min{k : sum_{i<=k} sigma_i^2 / sum_i sigma_i^2 >= tau}.

    ``S`` is sorted in decreasing order, ``shape`` is (m, n) of the update. tau = 1 keeps every
    numerically non-zero direction (see ``numerical_rank``), which reproduces the update exactly
    while dropping directions that are zero up to rounding, so the result does not depend on
    rounding noise. Below 1 the ratio is compared with a relative slack of ``ENERGY_RTOL``. The
    rank is at least 1, so an all-zero update still yields a valid (zero) adapter.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold (tau) must be in (0, 1], got {threshold}")
    kept = numerical_rank(S, shape)
    if kept == 0:
        return 1
    if threshold >= 1.0:
        return kept
    energy = S[:kept].to(torch.float64) ** 2
    ratio = torch.cumsum(energy, 0) / energy.sum()
    reached = torch.nonzero(ratio >= threshold - ENERGY_RTOL)
    return int(reached[0]) + 1 if reached.numel() else kept
