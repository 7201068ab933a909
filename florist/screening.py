"""Screen untrusted client uploads before a round is aggregated.

A client whose upload is malformed (wrong modules or shapes, NaN/Inf, non-positive example
count, absurd rank) is logged with its reason and left out of the round. The round goes on
while at least ``min_clients`` remain; otherwise it stops with one clear error listing why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from florist.aggregation.base import ClientUpdate, validate_updates
from florist.errors import FloristError

log = logging.getLogger("florist.screening")


@dataclass(frozen=True)
class Rejection:
    client_id: str
    reason: str


def check_update(
    update: ClientUpdate,
    expected_shapes: dict[str, tuple[int, int]] | None = None,
    *,
    max_rank: int | None = None,
) -> None:
    """Raise ValueError (naming the client and module) if one client's upload is unusable."""
    validate_updates([update])  # structure, ranks, dtype, finiteness, example count
    if expected_shapes is None:
        return
    missing = sorted(set(expected_shapes) - set(update.modules))
    extra = sorted(set(update.modules) - set(expected_shapes))
    if missing or extra:
        raise ValueError(
            f"client {update.client_id!r}: modules do not match the base model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, (out_features, in_features) in expected_shapes.items():
        f = update.modules[name]
        if (f.out_features, f.in_features) != (out_features, in_features):
            raise ValueError(
                f"client {update.client_id!r}, module {name!r}: update is {f.out_features}x{f.in_features} "
                f"but the base model's module is {out_features}x{in_features}"
            )
        limit = min(out_features, in_features) if max_rank is None else max_rank
        if f.rank > limit:
            raise ValueError(f"client {update.client_id!r}, module {name!r}: rank {f.rank} exceeds the limit {limit}")


def screen_updates(
    updates: Sequence[ClientUpdate],
    expected_shapes: dict[str, tuple[int, int]] | None = None,
    *,
    min_clients: int = 1,
    max_rank: int | None = None,
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Split uploads into accepted and rejected; raise if fewer than ``min_clients`` are accepted."""
    accepted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for update in updates:
        try:
            if update.client_id in seen:
                raise ValueError(f"client {update.client_id!r} uploaded twice in one round")
            check_update(update, expected_shapes, max_rank=max_rank)
        except ValueError as e:
            rejected.append(Rejection(update.client_id, str(e)))
            log.warning("rejected upload from client %r: %s", update.client_id, e)
            continue
        seen.add(update.client_id)
        accepted.append(update)
    if len(accepted) < min_clients:
        reasons = "; ".join(f"{r.reason}" for r in rejected) or "no uploads"
        raise FloristError(
            f"only {len(accepted)} of {len(updates)} client uploads passed screening "
            f"(min_clients={min_clients}): {reasons}"
        )
    return accepted, rejected
