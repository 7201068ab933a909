"""FFA-LoRA: A frozen and shared, only B is trained, sent and averaged.

All clients use the same frozen A, drawn from a common seed (``florist.training.ffa_frozen_A``);
with heterogeneous ranks client k uses its first r_k rows. Only B travels in either direction.
The server pads B_k to r_max columns and averages, B = sum_k p_k s_k pad(B_k), which is exact:
B A = sum_k p_k s_k B_k A_k because every A_k is a prefix of the same A. (The authors' code
froze B and trained A instead; that is a bug, not the method.)

Exactness rests on the A's really being shared, so the server checks it: client k's A must equal
the first r_k rows of the A of the client with the largest rank, bit for bit, or the round is
rejected with an error naming the client and the module. Scaling is handled as in zero-padding
(common scaling kept, otherwise folded into B). Client k continues from B[:, :r_k].
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
from florist.aggregation.linalg import fold_factors, leading, padded_weighted_sum, share_by_rank, to_cpu


def shared_A(updates: Sequence[ClientUpdate], name: str, dtype: torch.dtype) -> torch.Tensor:
    """The common frozen A of ``name`` at r_max; raise if any client's A is not a prefix of it."""
    reference = max(updates, key=lambda u: u.modules[name].rank)  # first client with the largest rank
    A = to_cpu(reference.modules[name].A, dtype)
    for u in updates:
        A_k = to_cpu(u.modules[name].A, dtype)
        prefix = A[: A_k.shape[0]]
        if not torch.equal(A_k, prefix):
            diff = float((A_k - prefix).abs().max())
            raise ValueError(
                f"client {u.client_id!r}, module {name!r}: FFA-LoRA needs the shared frozen A, but this "
                f"client's A differs from the first {A_k.shape[0]} rows of client {reference.client_id!r}'s "
                f"(max abs difference {diff:.3g}); were the clients initialised from different seeds?"
            )
    return A


@register
class FFA(Aggregator):
    name = "ffa"
    label = "FFA-LoRA"
    sends_client_rank = True  # client k gets its own first r_k directions
    uploaded_factors = ("B",)
    frozen_A = True
    client_init = "shared"
    client_inits = ("shared",)  # the frozen A must be shared for the average to be exact
    linear_in_uploads = True

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        p = client_weights(updates, self.dtype).tolist()
        average: dict[str, LoraFactors] = {}
        for name in names:
            A = shared_A(updates, name, self.dtype)
            folds, scaling = fold_factors(updates, name)
            Bs = [to_cpu(u.modules[name].B, self.dtype) for u in updates]
            B = padded_weighted_sum(Bs, [w * c for w, c in zip(p, folds)], A.shape[0], 1)
            average[name] = LoraFactors(A=A, B=B, scaling=scaling)
        adapter, per_client, ranks = share_by_rank(
            updates, names, lambda name, rank: leading(average[name], rank)
        )
        return self.result(adapter, ranks=ranks, per_client=per_client)
