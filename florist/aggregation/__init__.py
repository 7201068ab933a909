"""Aggregation methods, one short module each, behind one interface and a registry by name."""

from __future__ import annotations

import torch

from florist.aggregation import (  # noqa: F401  (registers)
    fedex,
    fedit,
    fedsa,
    ffa,
    flexlora,
    flora,
    florist,
    hetlora,
    lorafair,
    rolora,
    zeropad,
)
from florist.aggregation.base import (
    AGGREGATORS,
    Adapter,
    Aggregator,
    ClientUpdate,
    GlobalResult,
    LoraFactors,
    client_weights,
    register,
    validate_updates,
)

__all__ = [
    "AGGREGATORS",
    "Adapter",
    "Aggregator",
    "ClientUpdate",
    "GlobalResult",
    "LoraFactors",
    "available_methods",
    "client_weights",
    "get_aggregator",
    "register",
    "validate_updates",
]


def available_methods() -> list[str]:
    return sorted(AGGREGATORS)


def get_aggregator(name: str, *, dtype: torch.dtype = torch.float64, **options: object) -> Aggregator:
    """Build a registered method by name, e.g. ``get_aggregator("florist", threshold=0.9)``."""
    if name not in AGGREGATORS:
        raise ValueError(
            f"unknown aggregation method {name!r}; choose one of {', '.join(available_methods())}"
        )
    return AGGREGATORS[name](dtype=dtype, **options)
