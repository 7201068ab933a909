"""The plain data model every aggregation method shares, and the one interface they implement.

Nothing here knows about peft, transformers or nn.Modules: an adapter is a dict from module
name (as in ``model.named_modules()``, e.g. ``model.layers.0.self_attn.q_proj``) to the two
LoRA factors of that module and its scaling. The effective weight update of a module is
``scaling * B @ A``.
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

Factor = str  # "A" or "B"


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: A is (r, n_in), B is (n_out, r); the update is scaling * B @ A."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense update. Only for tests and small modules: it is (n_out, n_in)."""
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))

    def folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaling * B, A) in ``dtype``, so that the product is the effective update."""
        return self.B.to(dtype) * self.scaling, self.A.to(dtype)


Adapter = dict[str, LoraFactors]


@dataclass
class ClientUpdate:
    """What one client uploads after local training."""

    client_id: str
    num_examples: int
    modules: Adapter

    @property
    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.modules.items()}


@dataclass
class GlobalResult:
    """What the server broadcasts after one aggregation.

    Either ``adapter`` (one adapter for every client) or ``per_client`` (FlexLoRA: one per
    client id) is set. ``merge`` says whether clients fold the received update into their base
    weights and start a fresh LoRA (FLoRA, FLoRIST) or continue training from it (FedIT,
    zero-padding, FlexLoRA, FFA).
    """

    method: str
    merge: bool
    ranks: dict[str, int]
    adapter: Adapter | None = None
    per_client: dict[str, Adapter] | None = None
    singular_values: dict[str, torch.Tensor] = field(default_factory=dict)
    # Which factors travel on the wire in each direction (FFA: only B; A comes from a seed).
    downloaded_factors: tuple[Factor, ...] = ("A", "B")
    uploaded_factors: tuple[Factor, ...] = ("A", "B")
    options: dict[str, object] = field(default_factory=dict)
    # FedEx-LoRA: an update every client folds into its base weights (sent with both factors)
    # while it continues training from ``adapter``; base_update + adapter is the exact total.
    base_update: Adapter | None = None
    # The server's one view of the global model when clients hold different adapters (FedSA:
    # the average of the clients' updates); evaluated and written as adapter/. Its travelling
    # factors are the round's average; under DP it keeps only those (privacy.released_view).
    global_view: Adapter | None = None

    @property
    def folded(self) -> Adapter | None:
        """What every client folds into its base weights this round (None: nothing)."""
        return self.adapter if self.merge else self.base_update

    def adapter_for(self, client_id: str) -> Adapter:
        if self.per_client is not None:
            if client_id not in self.per_client:
                raise KeyError(f"no adapter for client {client_id!r} in the {self.method} result")
            return self.per_client[client_id]
        assert self.adapter is not None, "GlobalResult has neither adapter nor per_client"
        return self.adapter


@dataclass(frozen=True)
class BroadcastShape:
    """One module's broadcast from the clients' ranks alone (``Aggregator.broadcast_shape``)."""

    rank: int  # the broadcast adapter's rank
    per_client: tuple[int, ...]  # the rank client k downloads of it
    folded: int = 0  # the rank of an update folded into the base beside it, sent with both factors


class Aggregator(ABC):
    """One federated LoRA aggregation method: a pure function of the client updates."""

    name: ClassVar[str]
    label: ClassVar[str]  # how tables and plots name it
    # RunConfig settings the constructor takes (FLoRIST: threshold), and the one that
    # ``florist sweep`` runs a grid over (one local training serves every value).
    options: ClassVar[tuple[str, ...]] = ()
    swept_option: ClassVar[str | None] = None
    # The broadcast rank depends on the uploads' values, not only their ranks (FLoRIST's τ).
    rank_from_weights: ClassVar[bool] = False
    # Client k downloads only the first r_k directions of the broadcast (zero-padding, FlexLoRA...).
    sends_client_rank: ClassVar[bool] = False
    merges_into_base: ClassVar[bool] = False
    supports_heterogeneous: ClassVar[bool] = True
    uploaded_factors: ClassVar[tuple[Factor, ...]] = ("A", "B")
    # A is frozen at a seeded init that every client shares (FFA-LoRA); only B trains.
    frozen_A: ClassVar[bool] = False
    # How the clients of a round draw their fresh LoRA: "shared" (one init drawn from
    # (seed, round); client k takes its first r_k rows) or "per_client" (each its own). The
    # default follows the authors' code for each method (docs/methods.md); RunConfig.client_init
    # overrides it within client_inits.
    client_init: ClassVar[str] = "per_client"
    client_inits: ClassVar[tuple[str, ...]] = ("shared", "per_client")
    # What travels back is a fixed average of what travelled up (``sent_factors``), and the rest
    # of the result is public (the round's start) or the client's own (``local_factors``). Then
    # clipping each upload to C bounds one client's effect on the aggregate by C/m, and the sum of
    # the uploads is all the server needs: central DP and secure aggregation apply. False where
    # the individual adapters are needed (florist.privacy).
    linear_in_uploads: ClassVar[bool] = False
    # Per-client state: the factors each client keeps from its own training across rounds and
    # never sends (FedSA-LoRA: B). A driver that cannot keep per-client state must refuse these.
    local_factors: ClassVar[tuple[Factor, ...]] = ()

    @classmethod
    def trained_factors(cls, round_index: int) -> tuple[Factor, ...]:
        """The factors a client trains in round ``round_index`` (1-based); the rest are frozen."""
        return ("B",) if cls.frozen_A else ("A", "B")

    @classmethod
    def sent_factors(cls, round_index: int) -> tuple[Factor, ...]:
        """The factors a client uploads in round ``round_index``: declared uploaded and trained then
        (RoLoRA's frozen factor is the shared start, which the server already knows)."""
        trained = cls.trained_factors(round_index)
        return tuple(f for f in cls.uploaded_factors if f in trained)

    @classmethod
    def training_kind(cls) -> tuple[object, ...]:
        """What a client's round-1 training depends on besides its init: the sweep trains the
        clients once per distinct value (with the same inits)."""
        own_start = cls.initial_adapter.__func__ is not Aggregator.initial_adapter.__func__  # type: ignore[attr-defined]
        return (cls.frozen_A, cls.trained_factors(1), own_start)

    @classmethod
    def broadcast_shape(cls, client_ranks: Sequence[int], kept_rank: int | None = None) -> BroadcastShape:
        """What ``aggregate`` broadcasts for one module, from the clients' ranks alone (and the
        kept rank where ``rank_from_weights``): the paper's Eff tables for models never loaded.
        The tests check it against real aggregations."""
        rank = max(client_ranks)
        down = tuple(client_ranks) if cls.sends_client_rank else (rank,) * len(client_ranks)
        return BroadcastShape(rank, down)

    @classmethod
    def describe(cls, options: dict[str, object] | None = None) -> str:
        """The label of one configuration, e.g. "FLoRIST τ=0.90"."""
        return cls.label

    @classmethod
    def initial_adapter(
        cls, module_shapes: dict[str, tuple[int, int]], rank: int, seed: int
    ) -> Adapter | None:
        """A round-1 start every client shares, at ``rank`` (client k takes its first r_k
        directions), or None for the usual fresh LoRA (B = 0, A drawn per ``client_init``)."""
        return None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "aggregate" in cls.__dict__:
            cls.aggregate = _guarded(cls.__dict__["aggregate"])  # type: ignore[method-assign]

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"aggregation dtype must be float32 or float64, not {dtype}")
        self.dtype = dtype

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        """Combine the client updates of one round into what the server broadcasts."""

    def result(
        self,
        adapter: Adapter | None = None,
        *,
        ranks: dict[str, int] | None = None,
        factors: tuple[Factor, ...] | None = None,
        **fields: object,
    ) -> GlobalResult:
        """This method's result: its name and merge rule as declared, the ranks of ``adapter``
        unless given, and the factors that travel each way (default: those it uploads)."""
        factors = factors or self.uploaded_factors
        if ranks is None:
            assert adapter is not None, "ranks come from the adapter"
            ranks = {n: f.rank for n, f in adapter.items()}
        return GlobalResult(
            self.name, self.merges_into_base, ranks, adapter, downloaded_factors=factors, uploaded_factors=factors,
            **fields,  # type: ignore[arg-type]
        )  # fmt: skip

    def aggregate_mean(
        self, mean: Adapter, clients: Sequence[ClientUpdate], round_index: int
    ) -> GlobalResult:
        """The round's result when the server holds only the average of the uploads (secure
        aggregation), ``mean`` with the factors that did not travel filled in as the server knows
        them. Valid for ``linear_in_uploads`` methods: their aggregate of ``clients`` each uploading
        ``mean`` is ``mean`` itself, and per-client results keep the clients' ids."""
        stand_ins = [ClientUpdate(c.client_id, c.num_examples, mean) for c in clients]
        return self.for_round(self.aggregate(stand_ins), round_index)

    def for_round(self, result: GlobalResult, round_index: int) -> GlobalResult:
        """``result`` completed by the round's declarations where the uploads alone cannot tell
        (RoLoRA with one client: which factor trained). The identity for most methods."""
        return result

    def __repr__(self) -> str:  # the dtype and the constructor's options, e.g. FLoRIST's threshold
        params = inspect.signature(type(self).__init__).parameters
        options = "".join(
            f", {n}={getattr(self, n)!r}" for n, p in params.items() if p.kind is p.KEYWORD_ONLY
        )
        return f"{type(self).__name__}(dtype={self.dtype}{options})"


# --- shared checks and helpers -------------------------------------------------------------

# Headroom below the dtype's largest value: LAPACK's norms and rotations need some.
_RANGE_HEADROOM = 1e6


def check_range(updates: Sequence[ClientUpdate], dtype: torch.dtype) -> None:
    """Refuse updates whose aggregate could overflow ``dtype`` (finite uploads can still do so)."""
    limit = torch.finfo(dtype).max / _RANGE_HEADROOM
    total = float(sum(u.num_examples for u in updates))
    for name in updates[0].modules:
        bound = 0.0
        for u in updates:
            f = u.modules[name]
            size = float(f.B.abs().max()) * float(f.A.abs().max()) * f.rank * abs(f.scaling)
            bound += u.num_examples / total * size
            if float(f.B.abs().max()) * abs(f.scaling) > limit:
                raise ValueError(
                    f"client {u.client_id!r}, module {name!r}: scaled B reaches "
                    f"{float(f.B.abs().max()) * abs(f.scaling):.3g}, beyond what {dtype} can aggregate; aggregate in float64 (--dtype float64)"
                )
        if not bound < limit:
            raise ValueError(
                f"module {name!r}: the clients' updates reach about {bound:.3g}, beyond what {dtype} "
                "can aggregate; aggregate in float64 (--dtype float64)"
            )


def _guarded(aggregate: Callable[[Aggregator, Sequence[ClientUpdate]], GlobalResult]):
    """Wrap every method's ``aggregate``: validate the uploads and check their range first (so the
    methods can trust them), and never return NaN/Inf factors."""

    @functools.wraps(aggregate)
    def wrapper(self: Aggregator, updates: Sequence[ClientUpdate]) -> GlobalResult:
        validate_updates(updates, homogeneous=not self.supports_heterogeneous)
        check_range(updates, self.dtype)
        try:
            result = aggregate(self, updates)
        except torch.linalg.LinAlgError as e:
            raise ValueError(
                f"{self.name}: the decomposition failed ({e}); check the clients' uploads"
            ) from None
        adapters = [a for a in (result.adapter, result.base_update, result.global_view) if a is not None]
        adapters += list((result.per_client or {}).values())
        for adapter in adapters:
            for name, f in adapter.items():
                if not (bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all())):
                    raise ValueError(
                        f"module {name!r}: {self.name} produced NaN/Inf in {self.dtype}; aggregate in float64 (--dtype float64)"
                    )
        return result

    return wrapper


def validate_updates(updates: Sequence[ClientUpdate], *, homogeneous: bool = False) -> list[str]:
    """Check the round's uploads and return the sorted module names.

    Every problem is a ``ValueError`` naming the client and the module, because uploads come
    from other institutions and must never be trusted.
    """
    if len(updates) == 0:
        raise ValueError("no client updates to aggregate (zero clients)")
    seen: set[str] = set()
    for u in updates:
        if u.client_id in seen:
            raise ValueError(f"client {u.client_id!r} appears twice in one round")
        seen.add(u.client_id)
        if not isinstance(u.num_examples, int) or isinstance(u.num_examples, bool) or u.num_examples <= 0:
            raise ValueError(
                f"client {u.client_id!r}: num_examples must be a positive integer, got {u.num_examples!r}"
            )
        if not u.modules:
            raise ValueError(f"client {u.client_id!r}: the update has no modules")
    reference = updates[0]
    names = sorted(reference.modules)
    for u in updates:
        if set(u.modules) != set(names):
            missing = sorted(set(names) - set(u.modules))
            extra = sorted(set(u.modules) - set(names))
            raise ValueError(
                f"client {u.client_id!r}: modules differ from client {reference.client_id!r} "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"extra {extra[:3]}{'...' if len(extra) > 3 else ''})"
            )
        for name in names:
            f = u.modules[name]
            where = f"client {u.client_id!r}, module {name!r}"
            if f.A.ndim != 2 or f.B.ndim != 2:
                raise ValueError(
                    f"{where}: A and B must be matrices, got shapes {tuple(f.A.shape)} and {tuple(f.B.shape)}"
                )
            if f.A.shape[0] != f.B.shape[1]:
                raise ValueError(
                    f"{where}: rank mismatch, A is {tuple(f.A.shape)} but B is {tuple(f.B.shape)}"
                )
            if f.A.shape[0] == 0:
                raise ValueError(f"{where}: rank is 0")
            if not (f.A.is_floating_point() and f.B.is_floating_point()):
                raise ValueError(f"{where}: A and B must be floating point, got {f.A.dtype} and {f.B.dtype}")
            if not (bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all())):
                raise ValueError(f"{where}: contains NaN or Inf")
            if not (isinstance(f.scaling, (int, float)) and math.isfinite(f.scaling) and f.scaling > 0):
                raise ValueError(f"{where}: scaling must be a positive finite number, got {f.scaling!r}")
            ref = reference.modules[name]
            if (f.in_features, f.out_features) != (ref.in_features, ref.out_features):
                raise ValueError(
                    f"{where}: shape {f.out_features}x{f.in_features} differs from client "
                    f"{reference.client_id!r}'s {ref.out_features}x{ref.in_features}"
                )
            if homogeneous and f.rank != ref.rank:
                raise ValueError(
                    f"{where}: rank {f.rank} differs from client {reference.client_id!r}'s {ref.rank}; "
                    "this method needs homogeneous ranks (use zeropad, flora, flexlora or florist)"
                )
    return names


def client_weights(updates: Sequence[ClientUpdate], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """p_k = n_k / sum_j n_j, the FedAvg weights."""
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    return (n / n.sum()).to(dtype)


# --- registry ------------------------------------------------------------------------------

AGGREGATORS: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in AGGREGATORS and AGGREGATORS[cls.name] is not cls:
        raise ValueError(f"aggregator name {cls.name!r} registered twice")
    AGGREGATORS[cls.name] = cls
    return cls
