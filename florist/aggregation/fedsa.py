"""FedSA-LoRA (arXiv 2410.01463): only A is shared and averaged; each client keeps its own B.

Clients train both factors. They upload A_k only; the server returns Ā = Σ p_k A_k and client k
continues from (Ā, B_k), its own B kept across rounds (``local_factors``: per-client state,
checkpointed for resume). One factor travels each way. With heterogeneous ranks (the paper has
none) A is zero-padded to r_max before averaging and client k receives Ā[:r_k], as zero-padding.

The result holds one adapter per client, (Ā[:r_k], B_k, s_k), and a global view for evaluation:
the average of the clients' updates after the round, Σ p_k s_k B_k Ā[:r_k], kept factored as
B = Σ p_k s_k pad(B_k) and A = Ā (scaling 1). A real server never sees B_k, so only an
in-process run (or ``florist aggregate``, which reads the whole adapters) can form it; on Flower
B_k is zeros to the server and the view is (Ā, 0).

Central DP and secure aggregation apply (``linear_in_uploads``): what travels back, Ā, is a fixed
average of what travelled up, and B_k is the client's own. Under DP (either mode) the view keeps
only the (noised) Ā, with B = 0, in florist run as on Flower: Σ p_k s_k B_k is not part of any
upload, so releasing it would not be covered by the noise (``florist.privacy.released_view``).
"""

from __future__ import annotations

from collections.abc import Sequence

from florist.aggregation.base import (
    Aggregator,
    ClientUpdate,
    GlobalResult,
    LoraFactors,
    client_weights,
    register,
)
from florist.aggregation.linalg import padded_weighted_sum, to_cpu


@register
class FedSA(Aggregator):
    name = "fedsa"
    label = "FedSA-LoRA"
    sends_client_rank = True  # client k gets its own first r_k directions
    uploaded_factors = ("A",)
    local_factors = ("B",)
    client_init = "shared"  # one global A to start from, as in the authors' code
    linear_in_uploads = True  # Ā is the average of the uploaded A_k

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        p = client_weights(updates, self.dtype).tolist()
        per_client: dict[str, dict[str, LoraFactors]] = {u.client_id: {} for u in updates}
        view, ranks = {}, {}
        for name in names:
            rank = ranks[name] = max(u.modules[name].rank for u in updates)
            A = padded_weighted_sum([to_cpu(u.modules[name].A, self.dtype) for u in updates], p, rank, 0)
            Bs = [to_cpu(u.modules[name].B, self.dtype) for u in updates]
            for u, B_k in zip(updates, Bs):
                own = u.modules[name]
                per_client[u.client_id][name] = LoraFactors(
                    A=A[: own.rank].clone(), B=B_k, scaling=own.scaling
                )
            scaled = [w * u.modules[name].scaling for w, u in zip(p, updates)]
            view[name] = LoraFactors(A=A, B=padded_weighted_sum(Bs, scaled, rank, 1), scaling=1.0)
        return self.result(ranks=ranks, per_client=per_client, global_view=view)
