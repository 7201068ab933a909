"""RoLoRA (arXiv 2502.01755): alternate between training A and training B, average the trained one.

In odd rounds every client trains A with B frozen at the shared global B; in even rounds B with
A frozen at the shared global A. Because the frozen factor is the same for all clients, the
average of the trained factor is the exact average of the clients' updates:
Σ p_k s B A_k = s B (Σ p_k A_k), and likewise for B. Only the trained factor travels, each way.

The server does not trust the alternation: it finds which factor every client shares bit for bit
and averages the other; if neither is shared the round is refused (the average would not be
exact). Homogeneous ranks and one scaling only: the paper gives no rule otherwise.

Central DP and secure aggregation apply (``linear_in_uploads``): the trained factor's average is
all that travels back, and the frozen one is the public start. When the uploads share
both factors (a round with one client, or secure aggregation's identical stand-ins for the
average), they do not say which one trained: the round's declaration (``trained_factors``) does
(``for_round``).

Round 1 needs a shared start in which B is non-zero (with B = 0, A gets no gradient). The paper
leaves the init open; we start from A = 0 and a Kaiming-uniform B drawn from the run's seed
(``initial_adapter``), so the first global model is the base model, as with a usual LoRA init.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import torch

from florist.aggregation.base import (
    Adapter,
    Aggregator,
    ClientUpdate,
    Factor,
    GlobalResult,
    LoraFactors,
    client_weights,
    register,
)
from florist.aggregation.linalg import to_cpu


def _shared(updates: Sequence[ClientUpdate], name: str, factor: Factor) -> bool:
    first = getattr(updates[0].modules[name], factor)
    return all(torch.equal(getattr(u.modules[name], factor), first) for u in updates[1:])


@register
class RoLoRA(Aggregator):
    name = "rolora"
    label = "RoLoRA"
    supports_heterogeneous = False
    client_init = "shared"
    client_inits = ("shared",)  # exactness needs the frozen factor shared from round 1 on
    linear_in_uploads = True  # the trained factor's average; the frozen one is the public start

    @classmethod
    def trained_factors(cls, round_index: int) -> tuple[Factor, ...]:
        return ("A",) if round_index % 2 == 1 else ("B",)

    @classmethod
    def initial_adapter(cls, module_shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Adapter:
        out: Adapter = {}
        for name, (out_features, in_features) in sorted(module_shapes.items()):
            digest = hashlib.sha256(f"florist-rolora|{seed}|{name}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            B = torch.empty(out_features, rank, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=g)
            out[name] = LoraFactors(A=torch.zeros(rank, in_features), B=B, scaling=1.0)
        return out

    def for_round(self, result: GlobalResult, round_index: int) -> GlobalResult:
        # Uploads that share both factors (one client; SecAgg's identical stand-ins) do not say
        # which one trained, and aggregate took A: the round's declaration knows.
        if not result.options.get("both_shared"):
            return result
        (trained,) = self.trained_factors(round_index)
        return dataclasses.replace(
            result,
            downloaded_factors=(trained,),
            uploaded_factors=(trained,),
            options={**result.options, "trained_factor": trained},
        )

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        p = client_weights(updates, self.dtype)
        trained: Factor | None = None
        both_shared = True
        for name in names:
            scalings = {u.modules[name].scaling for u in updates}
            if len(scalings) > 1:
                raise ValueError(
                    f"module {name!r}: RoLoRA needs one scaling for all clients, got {sorted(scalings)}"
                )
            # The shared factor is the frozen one; A first when both are (then all updates agree).
            shared_A, shared_B = _shared(updates, name, "A"), _shared(updates, name, "B")
            both_shared = both_shared and shared_A and shared_B
            here: Factor | None = "A" if shared_B else "B" if shared_A else None
            if here is None or (trained is not None and here != trained):
                raise ValueError(
                    f"module {name!r}: RoLoRA needs every client to share one frozen factor "
                    f"({'neither A nor B is shared' if here is None else f'{trained} was trained in the other modules'}); "
                    "were the clients started from the same global adapter?"
                )
            trained = here
        adapter = {}
        for name in names:
            first = updates[0].modules[name]
            stack = torch.stack([to_cpu(getattr(u.modules[name], trained), self.dtype) for u in updates])
            average = torch.einsum("k,kij->ij", p, stack)
            A, B = (
                (average, to_cpu(first.B, self.dtype))
                if trained == "A"
                else (to_cpu(first.A, self.dtype), average)
            )
            adapter[name] = LoraFactors(A=A, B=B, scaling=first.scaling)
        assert trained is not None
        options = {"trained_factor": trained, "both_shared": both_shared}
        return self.result(adapter, factors=(trained,), options=options)
