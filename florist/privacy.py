"""Client-level differential privacy for federated LoRA: clipping, Gaussian noise, accounting.

What is clipped. A client's upload is its LoRA factors, so the server sees factors, not the dense
update ``s·B·A``. Bounding the dense update would not bound what travels (two factor pairs with
the same product can differ arbitrarily), so florist clips the factors that travel, as one
vector over every module: the change of each uploaded factor since the start of the round, with
B taken after scaling (``s·B``, the same folding the aggregators use), i.e.

    v = concat over modules of [ s·(B - B₀) , (A - A₀) ]     (FFA-LoRA: only s·(B - B₀))

and ``v ← v · min(1, C / ‖v‖₂)``. The start (A₀, B₀) is what the client began the round from: the
server's broadcast, or a fresh init drawn from the run's seed. Both are public, so releasing
``start + clip(v) + noise`` reveals no more than ``clip(v) + noise`` (post-processing). Which
factors travel is the aggregator's declaration: ``uploaded_factors`` that it trains that round
(``Aggregator.sent_factors``; RoLoRA's frozen factor is the public start, FedSA's B never leaves).

Two modes (``RunConfig.dp_mode``):

* ``local``: each client clips ``v`` to C and adds N(0, (z·C)²) to every coordinate before the
  upload leaves it. The server only ever sees noised uploads, so this holds for every method
  (stacking, SVD and residual methods alike), against the server itself.
* ``central``: the server (trusted) clips each upload the same way, averages them with uniform
  weights and adds N(0, (z·C/m)²) to every coordinate of the travelling factors of the average,
  m being the number of clients averaged. This mirrors Flower's
  ``DifferentialPrivacyServerSideFixedClipping`` (clip the update against the round's start, let
  FedAvg average, noise with ``compute_stdv(z, C, m)``) in the accounted mode Flower allows:
  equal client weights. It is valid only where the aggregate is that average
  (``Aggregator.linear_in_uploads``); otherwise one client's effect on the aggregate is not C/m.
  What does not travel is not noised: it is the public start (RoLoRA's frozen factor, FFA's A)
  or the client's own (FedSA's B_k, kept in its per-client result). A global view built from
  the latter (FedSA's Σ p_k s_k B_k Ā) is not released under either mode: the view keeps the
  (noised) average only (``released_view``).
  On Flower the server does not hold each node's round start, so each node clips its own upload
  and the server noises the uniform mean, as Flower's ``DifferentialPrivacyClientSideFixedClipping``
  does (the same mechanism, for honest clients); with ``secure_aggregation`` the server then
  sees only the sum of clipped uploads before it adds the noise.

Accounting. Both modes are accounted with Google's ``dp-accounting`` RDP accountant, client-level,
under add-or-remove-one-client adjacency (the client's whole data against a client that uploads
a zero update), as Flower's accountant does for its fixed-clipping wrappers. Each release is a
Gaussian mechanism with noise multiplier z (sensitivity C against noise z·C, or C/m against
z·C/m) and no amplification by sampling: florist's client sample is a public function of the
seed, and the server knows who took part, so subsampling hides nothing. Local DP composes the
releases a client took part in (the report is the worst client); central DP composes one release
per round. Under replace-one adjacency the sensitivity doubles: read ε at z/2.

The noise is drawn from a generator seeded by the operating system's entropy, never from the
run's seed: noise the server could regenerate from a public seed would protect nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch

from florist.aggregation.base import Adapter, ClientUpdate, Factor, GlobalResult, LoraFactors

DP_MODES = ("local", "central")
FLOAT32_DP_LIMIT = 1e30  # C and z·C: float32 ends at 3.4e38, and adapters and the wire are float32
ACCOUNTANT = "dp-accounting RDP, add-or-remove-one client, no amplification by sampling"
# Clip a hair below C so that float rounding (of the norm, of start + update) never takes the
# clipped norm above it.
_CLIP_MARGIN = 1.0 - 1e-12


def noise_generator() -> torch.Generator:
    """A generator for DP noise, seeded from the OS's entropy (unpredictable to the server)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


# --- the travelling vector --------------------------------------------------------------------


def factor_deltas(
    modules: Adapter, start: Adapter, factors: Sequence[Factor]
) -> dict[tuple[str, Factor], torch.Tensor]:
    """The travelling vector in pieces: s·(B - B₀) and A - A₀ per module, in float64."""
    out: dict[tuple[str, Factor], torch.Tensor] = {}
    for name in sorted(modules):
        f, f0 = modules[name], start[name]
        if f.A.shape != f0.A.shape or f.B.shape != f0.B.shape:
            raise ValueError(
                f"module {name!r}: the upload's factors {tuple(f.B.shape)}x{tuple(f.A.shape)} do not "
                f"match the round's start {tuple(f0.B.shape)}x{tuple(f0.A.shape)}"
            )
        if "B" in factors:
            out[(name, "B")] = f.scaling * (f.B.double() - f0.B.double())
        if "A" in factors:
            out[(name, "A")] = f.A.double() - f0.A.double()
    return out


def l2_norm(parts: Sequence[torch.Tensor]) -> float:
    """The L2 norm of the tensors as one flattened vector."""
    return math.sqrt(sum(float(p.double().square().sum()) for p in parts))


def clip_(parts: Sequence[torch.Tensor], clip_norm: float) -> float:
    """Scale the tensors in place so that their joint L2 norm is at most ``clip_norm``.

    Returns the norm before clipping. Like Flower's ``clip_inputs_inplace`` (one factor
    ``min(1, C/‖v‖)`` for the whole vector), with a margin so that rounding never exceeds C.
    """
    norm = l2_norm(parts)
    if norm > clip_norm:
        factor = clip_norm / norm * _CLIP_MARGIN
        for p in parts:
            p.mul_(factor)
    return norm


def add_noise_(parts: Sequence[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add N(0, std²) to every coordinate, in place."""
    for p in parts:
        p.add_(torch.randn(p.shape, dtype=p.dtype, generator=generator), alpha=std)


def _rebuild(
    modules: Adapter,
    start: Adapter,
    deltas: dict[tuple[str, Factor], torch.Tensor],
    dtype: torch.dtype | None = None,
) -> Adapter:
    """start + delta for the travelling factors (B un-scaled again), in ``dtype`` (None: the
    upload's); the others as uploaded."""
    out: Adapter = {}
    for name, f in modules.items():
        f0 = start[name]
        A, B = f.A, f.B
        if (name, "A") in deltas:
            A = (f0.A.double() + deltas[(name, "A")]).to(dtype or f.A.dtype)
        if (name, "B") in deltas:
            B = (f0.B.double() + deltas[(name, "B")] / f.scaling).to(dtype or f.B.dtype)
        out[name] = LoraFactors(A=A, B=B, scaling=f.scaling)
    return out


def clip_upload(
    update: ClientUpdate, start: Adapter, factors: Sequence[Factor], clip_norm: float
) -> tuple[ClientUpdate, float]:
    """The upload with its travelling vector clipped to ``clip_norm``; also the norm before.

    The clipped factors stay in float64: rounded to float32, start + clipped update could land
    above C again (central DP aggregates them in float64 before noising)."""
    deltas = factor_deltas(update.modules, start, factors)
    norm = clip_(list(deltas.values()), clip_norm)
    modules = _rebuild(update.modules, start, deltas, torch.float64)
    # start + delta - start rounds; where a large start takes it a hair above C, shrink again.
    for _ in range(8):
        released = l2_norm(list(factor_deltas(modules, start, factors).values()))
        if released <= clip_norm * _CLIP_MARGIN:
            break
        clip_(list(deltas.values()), clip_norm * _CLIP_MARGIN**2 * l2_norm(list(deltas.values())) / released)
        modules = _rebuild(update.modules, start, deltas, torch.float64)
    return dataclasses.replace(update, modules=modules), norm


def privatize_upload(
    update: ClientUpdate,
    start: Adapter,
    factors: Sequence[Factor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[ClientUpdate, float]:
    """Local DP: clip the travelling vector to C, add N(0, (z·C)²) to it, as the client does
    before uploading. Returns the private upload and the norm before clipping."""
    deltas = factor_deltas(update.modules, start, factors)
    parts = list(deltas.values())
    norm = clip_(parts, clip_norm)
    add_noise_(parts, noise_multiplier * clip_norm, generator)
    return dataclasses.replace(update, modules=_rebuild(update.modules, start, deltas)), norm


def central_std(noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """The noise std on the average of ``num_clients`` clipped uploads: z·C/m (Flower's compute_stdv)."""
    return noise_multiplier * clip_norm / num_clients


def noise_result(
    result: GlobalResult, factors: Sequence[Factor], std: float, generator: torch.Generator
) -> GlobalResult:
    """Central DP: the average with N(0, std²) added to every coordinate of its travelling
    factors (B after scaling, as clipped). With one adapter per client rank (zero-padding, FFA
    with heterogeneous ranks), the largest is noised and the others are its leading slices
    again, so every client receives the same noised average."""

    def noised(f: LoraFactors) -> LoraFactors:
        A, B = f.A, f.B
        if "A" in factors:
            A = A + torch.randn(A.shape, dtype=torch.float64, generator=generator).to(A.dtype) * std
        if "B" in factors:
            noise = torch.randn(B.shape, dtype=torch.float64, generator=generator) * (std / f.scaling)
            B = B + noise.to(B.dtype)
        return LoraFactors(A=A, B=B, scaling=f.scaling)

    if result.adapter is not None and result.per_client is None:
        return dataclasses.replace(result, adapter={n: noised(f) for n, f in sorted(result.adapter.items())})
    per_client = result.per_client or {}
    names = sorted(next(iter(per_client.values())))
    largest = {n: noised(max((a[n] for a in per_client.values()), key=lambda f: f.rank)) for n in names}

    def share(own: LoraFactors, n: str) -> LoraFactors:  # what does not travel stays the client's own
        # copies, not views: the checkpoint stores every client's adapter as its own tensors
        A = largest[n].A[: own.rank].clone() if "A" in factors else own.A
        B = largest[n].B[:, : own.rank].clone() if "B" in factors else own.B
        return LoraFactors(A=A, B=B, scaling=own.scaling)

    sliced = {cid: {n: share(a[n], n) for n in names} for cid, a in per_client.items()}
    adapter = largest if result.adapter is not None else None
    return released_view(dataclasses.replace(result, adapter=adapter, per_client=sliced), factors)


def released_view(result: GlobalResult, factors: Sequence[Factor]) -> GlobalResult:
    """The result with its global view (FedSA's Σ p_k s_k B_k Ā) cut to what travelled: the
    travelling factors from the per-client average (noised, under central DP), the others zeros.
    They do not travel (FedSA's B_k), so a server holds no such thing, and a view built from them
    would be released without noise. On Flower they already are zeros."""
    if result.global_view is None or not result.per_client:
        return result
    view = {}
    for n, f in sorted(result.global_view.items()):
        average = max((a[n] for a in result.per_client.values()), key=lambda g: g.rank)
        if average.rank != f.rank:
            raise ValueError(f"module {n!r}: the global view has rank {f.rank}, the average {average.rank}")
        A = average.A if "A" in factors else torch.zeros_like(f.A)
        B = average.B * (average.scaling / f.scaling) if "B" in factors else torch.zeros_like(f.B)
        view[n] = LoraFactors(A=A.clone(), B=B.clone(), scaling=f.scaling)
    return dataclasses.replace(result, global_view=view)


def uniform_weights(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """The uploads with equal weights: central DP's C/m needs a uniform average (as Flower's
    accounted fixed-clipping mode requires equal client weights)."""
    return [dataclasses.replace(u, num_examples=1) for u in updates]


# --- accounting -------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε after ``releases`` Gaussian releases of noise multiplier z at δ, from dp-accounting's
    RDP accountant (add-or-remove adjacency, no sampling)."""
    if releases <= 0:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # its convergence chatter is not ours
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
    return float(accountant.get_epsilon(delta))


def releases_per_round(mode: str, round_clients: Sequence[Sequence[str]]) -> list[int]:
    """How many releases the accountant has composed after each round: central DP one per round;
    local DP the most rounds any single client has taken part in so far."""
    if mode == "central":
        return list(range(1, len(round_clients) + 1))
    seen: dict[str, int] = {}
    out = []
    for clients in round_clients:
        for c in clients:
            seen[c] = seen.get(c, 0) + 1
        out.append(max(seen.values(), default=0))
    return out


def privacy_report(cfg: Any, rounds: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``metrics.json``'s ``privacy`` section from the run's rounds, or None without DP."""
    if not dp_enabled(cfg):
        return None
    z, delta = float(cfg.dp_noise_multiplier), float(cfg.dp_delta)
    releases = releases_per_round(cfg.dp_mode, [r["clients"] for r in rounds])
    per_round = [_finite_epsilon(z, n, delta) for n in releases]
    report = {
        "mode": cfg.dp_mode,
        "clip_norm": float(cfg.dp_clip_norm),
        "noise_multiplier": z,
        "delta": delta,
        "epsilon": per_round[-1] if per_round else 0.0,
        "epsilon_per_round": per_round,
        "releases": releases[-1] if releases else 0,
        "accountant": ACCOUNTANT,
    }
    if None in per_round:
        report["epsilon_note"] = _infinite_epsilon_note(z)
    return report


def _finite_epsilon(noise_multiplier: float, releases: int, delta: float) -> float | None:
    """``epsilon``, or None where it is infinite (strict JSON has no Infinity; a note says why)."""
    with warnings.catch_warnings():  # numpy's overflow warning: the infinite result says it
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = epsilon(noise_multiplier, releases, delta)
    return eps if math.isfinite(eps) else None


def _infinite_epsilon_note(z: float) -> str:
    return (
        f"epsilon is infinite (written as null): noise multiplier {z!r} is too small for the "
        "accountant to bound the privacy loss, so there is no privacy guarantee"
    )


def dp_enabled(cfg: Any) -> bool:
    return float(getattr(cfg, "dp_clip_norm", 0.0) or 0.0) > 0.0


# --- config checks (RunConfig.validate) ---------------------------------------------------------

IN_PROCESS_SECAGG = (
    "--secure_aggregation applies to Flower runs (florist flower), where the clients are other "
    "machines; florist run and florist sweep simulate every client in this one process"
)


def _linear_methods() -> str:
    from florist.aggregation import AGGREGATORS

    return ", ".join(sorted(n for n, cls in AGGREGATORS.items() if cls.linear_in_uploads))


def check_config(cfg: Any) -> str | None:
    """The one-line reason ``cfg``'s privacy settings are invalid, or None."""
    from florist.aggregation import AGGREGATORS

    # Types and ranges (finite, >= 0, delta in (0, 1), the mode) are RunConfig's settings' checks.
    linear = AGGREGATORS[cfg.method].linear_in_uploads
    if cfg.secure_aggregation and not linear:
        return (
            f"--secure_aggregation is not possible with {cfg.method}: it needs each client's individual "
            "adapter (stacking, SVD, residuals or weights that depend on the uploads), and secure "
            f"aggregation shows the server only the sum of the uploads; it works with {_linear_methods()}"
        )
    sampled = min(cfg.num_clients, max(cfg.min_clients, int(cfg.client_selection_frac * cfg.num_clients)))
    if cfg.secure_aggregation and sampled < 2:
        return f"--secure_aggregation needs at least 2 clients per round (the sum of one is its upload), got {sampled}"
    if cfg.secure_aggregation and cfg.heter:
        return (
            "--secure_aggregation needs homogeneous ranks: SecAgg+ sums vectors of one shape, and the "
            "server may not see a client's rank-padded upload"
        )
    if not dp_enabled(cfg):
        if cfg.dp_noise_multiplier > 0 or cfg.dp_mode != "local":
            return "differential privacy needs --dp_clip_norm C > 0 (with --dp_noise_multiplier z > 0)"
        return None
    if cfg.dp_noise_multiplier <= 0:
        return "--dp_clip_norm needs --dp_noise_multiplier z > 0 (without noise, epsilon is infinite)"
    # Uploads travel and are written in float32: a clipped update of norm C plus noise of std z·C
    # (a few std in the tails) must stay far inside its range, or the round is garbage.
    for flag, value in (
        ("--dp_clip_norm", cfg.dp_clip_norm),
        ("--dp_noise_multiplier", cfg.dp_noise_multiplier * cfg.dp_clip_norm),
    ):
        if value > FLOAT32_DP_LIMIT:
            what = "C" if flag == "--dp_clip_norm" else "the noise std z·C"
            return (
                f"{flag} {getattr(cfg, flag[2:])!r} is too large: {what} = {value:.3g} is beyond what float32 "
                f"uploads can carry (at most {FLOAT32_DP_LIMIT:g})"
            )
    rounds = int(cfg.num_communication_rounds)  # no client is released more often than once a round
    if _finite_epsilon(float(cfg.dp_noise_multiplier), rounds, float(cfg.dp_delta)) is None:
        return (
            f"--dp_noise_multiplier {cfg.dp_noise_multiplier!r} is too small: epsilon would be infinite "
            f"after {rounds} round(s), which is no privacy guarantee; use a larger noise multiplier"
        )
    if cfg.dp_mode == "central":
        if not linear:
            return (
                f"--dp_mode central is not valid for {cfg.method}: it combines the clients' individual "
                "adapters nonlinearly (stacking, SVD, residuals or weights that depend on the uploads), "
                "so one client's effect on the aggregate "
                f"is not bounded by C/m; use --dp_mode local, or a method that averages its uploads "
                f"({_linear_methods()})"
            )
    return None


# --- one round, as florist run and the Flower server do it ---------------------------------------


@dataclasses.dataclass
class CentralDP:
    """Central DP around a method's aggregation, as Flower's ``DifferentialPrivacyServerSide-``
    and ``ClientSideFixedClipping`` wrap a strategy: every upload's travelling vector clipped to C
    (by the server when it sees the uploads, ``server_clips``; else the clients clipped their own),
    the clipped uploads averaged with equal weights, and N(0, (z·C/m)²) added to the average."""

    clip_norm: float
    noise_multiplier: float
    server_clips: bool
    generator: torch.Generator

    @classmethod
    def of(cls, cfg: Any, *, server_clips: bool) -> CentralDP | None:
        """The wrapper ``cfg`` asks for, or None without central DP."""
        if not (dp_enabled(cfg) and cfg.dp_mode == "central"):
            return None
        return cls(cfg.dp_clip_norm, cfg.dp_noise_multiplier, server_clips, noise_generator())

    def aggregate(
        self,
        aggregate: Callable[[list[ClientUpdate]], GlobalResult],
        updates: Sequence[ClientUpdate],
        starts: dict[str, Adapter] | None,
        factors: Sequence[Factor],
    ) -> tuple[GlobalResult, dict[str, float] | None]:
        """The noised result, and the norms before clipping where the server clipped (the
        trusted server's own diagnostics; a server that did not clip never sees one)."""
        norms: dict[str, float] | None = None
        clipped = list(updates)
        if self.server_clips:
            assert starts is not None, "the server clips against each client's start"
            norms, clipped = {}, []
            for u in updates:
                upload, norms[u.client_id] = clip_upload(u, starts[u.client_id], factors, self.clip_norm)
                clipped.append(upload)
        result = aggregate(uniform_weights(clipped))
        std = central_std(self.noise_multiplier, self.clip_norm, len(clipped))
        return noise_result(result, factors, std, self.generator), norms


def central_aggregate(
    aggregator: Any,
    updates: Sequence[ClientUpdate],
    starts: dict[str, Adapter],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    factors: Sequence[Factor] | None = None,
) -> tuple[GlobalResult, dict[str, float]]:
    """Central DP by a server that sees the uploads (``CentralDP`` with ``server_clips``):
    ``factors`` default to all the method uploads. Returns the result and the norms before
    clipping."""
    factors = factors if factors is not None else aggregator.uploaded_factors
    wrapper = CentralDP(clip_norm, noise_multiplier, True, generator)
    result, norms = wrapper.aggregate(aggregator.aggregate, updates, starts, factors)
    assert norms is not None
    return result, norms


def round_privacy(
    cfg: Any, rounds: Sequence[dict[str, Any]], norms: dict[str, float] | None = None
) -> dict[str, Any]:
    """A round's ``privacy`` entry: ε so far (``rounds`` ends with this round) and, where the
    norms are known (florist run simulates the clients), how many uploads the clip bound cut.
    A Flower server under local DP never sees a norm: it would leak."""
    releases = releases_per_round(cfg.dp_mode, [r["clients"] for r in rounds])[-1]
    entry: dict[str, Any] = {
        "epsilon": _finite_epsilon(float(cfg.dp_noise_multiplier), releases, float(cfg.dp_delta))
    }
    if entry["epsilon"] is None:
        entry["epsilon_note"] = _infinite_epsilon_note(float(cfg.dp_noise_multiplier))
    if norms is not None:
        entry["clipped"] = sum(1 for n in norms.values() if n > cfg.dp_clip_norm)
    return entry
