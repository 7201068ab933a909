"""Zero-padding: FedIT for heterogeneous ranks.

Every A_k is padded with zero rows and every B_k with zero columns to r_max = max_k r_k, then the
two factors are averaged as in FedIT. Client k continues from the first r_k directions of that
average (A[:r_k], B[:, :r_k]); ``GlobalResult.per_client`` holds exactly those slices, so the
download is counted at r_k. The client with the largest rank receives the whole average.

Scaling. The authors' code mixed the clients' scalings up when padding. Here: if every client
has the same scaling s (the paper's alpha = 2 r_k gives s = 2 for all), the average and every
slice keep s, so client k's update is s * B[:, :r_k] A[:r_k] under its own alpha_k / r_k. If the
scalings differ, each s_k is folded into B_k before averaging and the output has scaling 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from florist.aggregation.base import (
    Aggregator,
    ClientUpdate,
    GlobalResult,
    client_weights,
    register,
)
from florist.aggregation.linalg import leading, padded_average, share_by_rank


@register
class ZeroPad(Aggregator):
    name = "zeropad"
    label = "Zero-padding"
    sends_client_rank = True  # client k gets its own first r_k directions
    linear_in_uploads = True  # a fixed average of the padded factors

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalResult:
        names = sorted(updates[0].modules)  # validated by Aggregator
        weights = client_weights(updates, self.dtype)
        average = {name: padded_average(updates, name, weights, self.dtype) for name in names}
        adapter, per_client, ranks = share_by_rank(
            updates, names, lambda name, rank: leading(average[name], rank)
        )
        return self.result(adapter, ranks=ranks, per_client=per_client)
