"""Personalised evaluation for methods whose clients keep their own factors (FedSA-LoRA).

Each client's own model (base + s_k B_k Ā) is scored on that client's held-out records:

* ``<data_path>/<K>/local_test_<k>.json`` when the data set has one per client;
* otherwise the global test set reweighted to the client's own mix of categories: a record of
  category c weighs share_k(c) / |test records of c|, so the loss estimates the client's held-out
  loss under its own label distribution (the paper's Dolly split draws each client's categories
  from a Dirichlet). Without categories there is nothing to reweight and every record weighs 1.

The global view (the average of the clients' updates) is evaluated on the global test set by the
usual ``eval_after``; ``metrics["eval_personal"]`` holds the per-client scores beside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from florist.aggregation import Adapter
from florist.algebra import client_id, truncate_adapter, with_local_factors
from florist.errors import FloristError


def category_weights(train: Sequence[dict], test: Sequence[dict]) -> list[float]:
    """share of the record's category in ``train`` / number of ``test`` records of that category."""
    if not all("category" in r for r in test):
        return [1.0] * len(test)
    share = Counter(r.get("category") for r in train)
    count = Counter(r["category"] for r in test)
    total = sum(share.values()) or 1
    return [share[r["category"]] / total / count[r["category"]] for r in test]


def weighted_loss(scores: dict[str, Any], weights: Sequence[float]) -> float | None:
    """Token-weighted loss with per-record weights, from ``heldout_loss``'s per-record sums."""
    recs = scores["records"]
    num = sum(weights[i] * loss for i, loss in zip(recs["index"], recs["loss_sum"]))
    den = sum(weights[i] * tokens for i, tokens in zip(recs["index"], recs["tokens"]))
    return num / den if den > 0 else None


def evaluate_personal(
    adapters: dict[str, Adapter],
    client_records: Sequence[Sequence[dict]],
    global_test: Sequence[dict],
    score: Callable[[Adapter, Sequence[dict]], dict[str, Any]],
    *,
    data_path: str | Path,
    weights: dict[str, float],
) -> dict[str, Any]:
    """Score each client's own adapter (``adapters``: client id -> adapter) on its held-out records.

    ``score(adapter, records)`` returns ``heldout_loss``'s dict; ``weights`` are the p_k of the
    mean over clients.
    """
    from florist.data import find_test_file, load_dataset_file

    clients: dict[str, Any] = {}
    for k, train in enumerate(client_records):
        cid = client_id(k)
        if cid not in adapters:
            continue
        own = find_test_file(data_path, len(client_records), f"local_test_{k}.json")
        if own is not None:
            records, _fmt = load_dataset_file(own)
            try:
                result = score(adapters[cid], records)
            except FloristError as e:  # e.g. the cutoff leaves none of its responses to score
                clients[cid] = {"loss": None, "n_records": 0, "source": str(own), "skipped": str(e)}
                continue
            clients[cid] = {
                "loss": result["loss"],
                "n_records": result["n_records"],
                "source": str(own),
                "records": result.get("records"),  # per-record sums, for paired intervals
            }
        elif global_test:
            result = score(adapters[cid], global_test)
            loss = weighted_loss(result, category_weights(train, global_test))
            clients[cid] = {
                "loss": loss,
                "unweighted_loss": result["loss"],
                "n_records": result["n_records"],
                "source": "global test reweighted to the client's categories",
            }
    scored = {cid: c for cid, c in clients.items() if c["loss"] is not None}
    total = sum(weights.get(cid, 0.0) for cid in scored)
    mean = sum(weights.get(cid, 0.0) * c["loss"] for cid, c in scored.items()) / total if total else None
    return {"clients": clients, "mean_loss": mean}


def evaluate_run(
    cfg: Any, setup: Any, server: Any, local_factors: tuple[str, ...], global_test: Sequence[dict]
) -> dict[str, Any]:
    """``evaluate_personal`` after a round of ``florist run`` or the sweep (``setup``: their
    ``florist.federation.ClientSetup``), with their held-out scoring: every client that has trained,
    with the adapter it would continue from (the last broadcast, its own local factors); p_k are
    the data shares."""
    host, datasets = setup.host, setup.records
    from florist.evaluation.heldout import heldout_loss

    def score(adapter: Adapter, records: Sequence[dict]) -> dict[str, Any]:
        with host.use_adapter(adapter) as model:
            return heldout_loss(
                model, setup.tokenizer, list(records), cutoff_len=cfg.cutoff_len, prompter=setup.prompter,
                max_records=cfg.eval_samples,
            )  # fmt: skip

    adapters = {}
    for k in range(cfg.num_clients):
        cid = client_id(k)
        received = server.continuation(cid)
        if cid in server.client_state and received is not None:
            own = truncate_adapter(received, cfg.client_rank(k))
            adapters[cid] = with_local_factors(own, server.client_state[cid], local_factors)
    total = sum(len(d) for d in datasets)
    weights = {client_id(k): len(d) / total for k, d in enumerate(datasets)}
    return evaluate_personal(adapters, datasets, global_test, score, data_path=cfg.data_path, weights=weights)
