"""Communication accounting: what crosses the wire in one round, and the paper's Eff metric.

``round_communication`` counts the tensors actually exchanged: each client uploads the factors in
``result.uploaded_factors`` of its own update, and downloads the factors in
``result.downloaded_factors`` of the adapter the server sends it (``result.adapter_for``: the
shared adapter, or its own one for zero-padding/FlexLoRA/FFA with heterogeneous ranks). Bytes are
parameters times the item size of the wire dtype (float32 by default; ``None`` = the tensors' own
dtype).

The paper's ``Eff = 1 / sum_modules (broadcast rank)``, one factor counting half (FFA sends only
B; FedSA-LoRA and RoLoRA one factor too), plus the rank of any update folded into the base beside
it (FedEx-LoRA's residual, ``result.base_update``, sent with both factors). ``shape_communication``
and ``eff_for_shapes`` give the same quantities from module shapes and ranks alone, from each
method's declarations, to reproduce the paper's tables for models we do not load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from florist.aggregation.base import ClientUpdate, GlobalResult


def zero_counts() -> dict[str, int]:
    """Parameters and bytes, each way, all zero."""
    return {"params_up": 0, "bytes_up": 0, "params_down": 0, "bytes_down": 0}


def paper_eff(result: GlobalResult) -> float:
    """1 / sum over modules of the broadcast rank, weighted by the share of factors downloaded."""
    weight = len(result.downloaded_factors) / 2
    total = sum(result.ranks.values()) * weight
    # FedEx-LoRA's residual goes down with both factors, beside the adapter clients continue from.
    total += sum(f.rank for f in (result.base_update or {}).values())
    if total <= 0:
        raise ValueError(f"{result.method} result broadcasts nothing (sum of ranks is 0)")
    return 1.0 / total


def round_communication(
    result: GlobalResult, updates: Sequence[ClientUpdate], *, wire_dtype: torch.dtype | None = torch.float32
) -> dict:
    """Parameters and bytes up and down, per client, per module and in total, plus Eff."""
    clients: dict[str, dict[str, int]] = {}
    modules: dict[str, dict[str, int]] = {name: zero_counts() for name in result.ranks}
    for u in updates:
        c = clients[u.client_id] = zero_counts()
        sent = [(name, "up", getattr(f, k)) for name, f in u.modules.items() for k in result.uploaded_factors]
        received = result.adapter_for(u.client_id)
        sent += [
            (name, "down", getattr(f, k)) for name, f in received.items() for k in result.downloaded_factors
        ]
        sent += [(name, "down", t) for name, f in (result.base_update or {}).items() for t in (f.A, f.B)]
        for name, direction, tensor in sent:
            params = tensor.numel()
            size = params * (tensor.dtype if wire_dtype is None else wire_dtype).itemsize
            for counter in (c, modules.setdefault(name, zero_counts())):
                counter[f"params_{direction}"] += params
                counter[f"bytes_{direction}"] += size
    total = {key: sum(c[key] for c in clients.values()) for key in zero_counts()}
    return {
        "method": result.method,
        "wire_dtype": str(wire_dtype).removeprefix("torch.") if wire_dtype is not None else "native",
        "num_clients": len(clients),
        "clients": clients,
        "modules": {
            name: {**counts, "broadcast_rank": result.ranks.get(name, 0)} for name, counts in modules.items()
        },
        "total": {
            **total,
            "params": total["params_up"] + total["params_down"],
            "bytes": total["bytes_up"] + total["bytes_down"],
        },
        "broadcast_rank_sum": int(sum(result.ranks.values())),
        "eff": paper_eff(result),
    }


def shape_communication(
    module_shapes: Sequence[tuple[int, int]],
    client_ranks: Sequence[int],
    method: str,
    *,
    florist_rank: int | Sequence[int] | None = None,
    wire_dtype: torch.dtype = torch.float32,
    round_index: int = 1,
) -> dict:
    """One round's communication from shapes alone: ``module_shapes`` is (out, in) per module.

    ``client_ranks`` are the clients' LoRA ranks (one per client). Where the broadcast rank
    depends on the weights (FLoRIST's p) it is given as ``florist_rank`` (one int, or one per
    module). ``round_index`` picks the factors that travel (RoLoRA: A in odd rounds, B in even).
    Everything else is what each method declares (``Aggregator.broadcast_shape``,
    ``sent_factors``), so this stays in step with the aggregators by construction.
    """
    from florist.aggregation import AGGREGATORS

    if method not in AGGREGATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(AGGREGATORS))}")
    cls = AGGREGATORS[method]
    ranks = [int(r) for r in client_ranks]
    if not ranks or min(ranks) <= 0:
        raise ValueError(f"client_ranks must be non-empty and positive, got {list(client_ranks)}")
    if not cls.supports_heterogeneous and len(set(ranks)) > 1:
        raise ValueError(f"{method} needs homogeneous ranks, got {ranks}")
    kept: list[int | None] = [None] * len(module_shapes)
    if florist_rank is not None:
        kept = (
            [int(florist_rank)] * len(module_shapes) if isinstance(florist_rank, int) else list(florist_rank)
        )
        if len(kept) != len(module_shapes):
            raise ValueError(f"florist_rank has {len(kept)} entries for {len(module_shapes)} modules")
    factors = cls.sent_factors(round_index)  # what travels, each way
    itemsize = wire_dtype.itemsize
    clients = [zero_counts() for _ in ranks]
    rank_sum = weighted = 0.0
    for (m, n), p in zip(module_shapes, kept):
        shape = cls.broadcast_shape(ranks, p)
        rank_sum += shape.rank
        weighted += shape.rank * len(factors) / 2 + shape.folded
        per_rank = (m if "B" in factors else 0) + (n if "A" in factors else 0)
        for k, r_k in enumerate(ranks):
            clients[k]["params_up"] += r_k * per_rank
            clients[k]["params_down"] += shape.per_client[k] * per_rank + shape.folded * (m + n)
    for c in clients:
        c["bytes_up"], c["bytes_down"] = c["params_up"] * itemsize, c["params_down"] * itemsize
    total = {key: sum(c[key] for c in clients) for key in zero_counts()}
    return {
        "method": method,
        "clients": clients,
        "total": total,
        "broadcast_rank_sum": int(rank_sum),
        "eff": 1.0 / weighted,
    }


def eff_for_shapes(
    num_layers: int,
    modules_per_layer: int,
    rank: int | Sequence[int],
    method: str,
    num_clients: int = 8,
    *,
    florist_rank: int | None = None,
) -> float:
    """The paper's Eff for a model with ``num_layers`` x ``modules_per_layer`` adapted modules.

    ``rank`` is the clients' common rank or their list of ranks (then ``num_clients`` is unused).
    E.g. TinyLlama (22 layers, q and v, r = 16, 8 clients): FedIT 14.20e-4, FLoRA 1.78e-4,
    FFA 28.40e-4.
    """
    ranks = [rank] * num_clients if isinstance(rank, int) else list(rank)
    shapes = [(1, 1)] * (num_layers * modules_per_layer)  # Eff does not depend on the sizes
    return shape_communication(shapes, ranks, method, florist_rank=florist_rank)["eff"]


def total_communication(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the per-round totals (parameters and bytes, each direction) over all rounds."""
    total: dict[str, Any] = {}
    for r in rounds:
        for key, value in r["communication"].get("total", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def eff_over_rounds(effs: list[float]) -> float:
    """The paper's Eff over several rounds: 1 / (sum over rounds of the broadcast rank sum)."""
    denominator = sum(1.0 / e for e in effs if e > 0)
    return 1.0 / denominator if denominator else 0.0
