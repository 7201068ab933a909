"""Screen untrusted client uploads before a round is aggregated.

A client whose upload is malformed (wrong modules or shapes for the base model, a rank other
than the one it was assigned or above the module's size, NaN/Inf, a non-positive example
count, an id used twice in the round) is logged with its reason and left out of the round. The
round goes on while at least ``min_clients`` remain; otherwise it stops with one clear error
listing why each client was refused.

Screening looks at one upload at a time, so one client cannot get another refused (except by
reusing its id: then every upload under that id is refused, since the server cannot tell which
one is genuine). Consistency *between* accepted uploads (same modules, same shapes) follows
from each matching the base model's ``expected_shapes``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from florist.aggregation.base import ClientUpdate, validate_updates
from florist.errors import FloristError

log = logging.getLogger("florist.screening")


@dataclass(frozen=True)
class Rejection:
    """One refused upload and why (JSON-ready with ``dataclasses.asdict``)."""

    client_id: str
    reason: str


def check_update(
    update: ClientUpdate,
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
    *,
    max_rank: int | None = None,
    expected_rank: int | None = None,
) -> None:
    """Raise ValueError (naming the client and module) if one client's upload is unusable.

    ``expected_shapes`` maps every adapted module of the base model to its (out_features,
    in_features); the upload must cover exactly these modules with these shapes. ``max_rank``
    bounds every module's rank (default: min(out, in) of the module, the largest meaningful
    rank, unless ``expected_rank`` is given); ``expected_rank`` is the rank the server assigned to this client.
    """
    if not isinstance(update, ClientUpdate):
        raise TypeError(f"expected a ClientUpdate, got {type(update).__name__}")
    validate_updates([update])  # structure, rank consistency, dtype, finiteness, example count
    where = f"client {update.client_id!r}"
    if expected_shapes is not None:
        missing = sorted(set(expected_shapes) - set(update.modules))
        extra = sorted(set(update.modules) - set(expected_shapes))
        if missing or extra:
            raise ValueError(
                f"{where}: modules do not match the base model "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
            )
    for name, f in update.modules.items():
        if expected_shapes is not None:
            out_features, in_features = expected_shapes[name]
            if (f.out_features, f.in_features) != (out_features, in_features):
                raise ValueError(
                    f"{where}, module {name!r}: update is {f.out_features}x{f.in_features} "
                    f"but the base model's module is {out_features}x{in_features}"
                )
        if expected_rank is not None and f.rank != expected_rank:
            raise ValueError(
                f"{where}, module {name!r}: rank {f.rank}, but the client was assigned rank {expected_rank}"
            )
        # An assigned rank is the server's own choice (the paper gives rank 64 to 32-wide modules);
        # without one, a rank above min(out, in) adds nothing and is refused.
        limit = (
            max_rank
            if max_rank is not None
            else None
            if expected_rank
            else min(f.out_features, f.in_features)
        )
        if limit is not None and f.rank > limit:
            raise ValueError(f"{where}, module {name!r}: rank {f.rank} exceeds the limit {limit}")


def screen_updates(
    updates: Sequence[ClientUpdate],
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
    *,
    min_clients: int = 1,
    max_rank: int | None = None,
    expected_ranks: Mapping[str, int] | None = None,
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Split uploads into (accepted, rejected), in input order.

    ``expected_ranks`` maps client id to its assigned rank (clients not listed are not
    checked). Raises FloristError when fewer than ``min_clients`` uploads are accepted.
    """
    if min_clients < 1:
        raise ValueError(f"min_clients must be at least 1, got {min_clients}")
    counts = Counter(getattr(u, "client_id", None) for u in updates)
    accepted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    for update in updates:
        cid = getattr(update, "client_id", None)
        try:
            if counts[cid] > 1:
                raise ValueError(f"client {cid!r} uploaded {counts[cid]} times in one round")
            rank = None if expected_ranks is None else expected_ranks.get(cid)
            check_update(update, expected_shapes, max_rank=max_rank, expected_rank=rank)
        except (ValueError, TypeError) as e:
            reason = " ".join(str(e).split())  # one line, whatever the message held
            rejected.append(Rejection(str(cid), reason))
            log.warning("rejected the upload of client %r: %s", cid, reason)
            continue
        accepted.append(update)
    if len(accepted) < min_clients:
        reasons = "; ".join(r.reason for r in rejected) or "no uploads"
        raise FloristError(
            f"only {len(accepted)} of {len(updates)} client uploads passed screening "
            f"(min_clients={min_clients}): {reasons}"
        )
    return accepted, rejected
