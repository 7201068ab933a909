"""Confidence intervals for held-out losses: percentile bootstrap over records.

A held-out loss is a token-weighted mean, Σ_r loss_r / Σ_r tokens_r over records r (each record
contributes the summed loss of its scored tokens). Records, not tokens, are the independent
units, so the bootstrap resamples records and recomputes that same ratio. Differences between two
models evaluated on the same records are paired: each resample takes the same records for both,
which removes the between-record variance that the two share (most of it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RESAMPLES = 4000
LEVEL = 0.95


def _resample_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    if n <= 0:
        raise ValueError("bootstrap needs at least one record")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=g)


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    alpha = (1.0 - level) / 2.0
    low, high = torch.quantile(values, torch.tensor([alpha, 1.0 - alpha], dtype=values.dtype))
    return float(low), float(high)


def _as_tensor(values: Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.ndim != 1 or not bool(torch.isfinite(t).all()):
        raise ValueError("per-record values must be a finite 1-D sequence")
    return t


def weighted_mean(loss_sums: Sequence[float], tokens: Sequence[float]) -> float:
    return float(_as_tensor(loss_sums).sum() / _as_tensor(tokens).sum())


def bootstrap_ci(
    loss_sums: Sequence[float],
    tokens: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of Σ loss / Σ tokens, resampling records."""
    losses, weights = _as_tensor(loss_sums), _as_tensor(tokens)
    if losses.shape != weights.shape:
        raise ValueError(f"{len(losses)} loss sums but {len(weights)} token counts")
    idx = _resample_indices(len(losses), resamples, seed)
    return _percentiles(losses[idx].sum(1) / weights[idx].sum(1), level)


def paired_bootstrap_ci(
    loss_sums_a: Sequence[float],
    loss_sums_b: Sequence[float],
    tokens: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of mean_a - mean_b (token-weighted) for two models scored on the same records:
    the bootstrap of the per-record differences."""
    a, b = _as_tensor(loss_sums_a), _as_tensor(loss_sums_b)
    if not (a.shape == b.shape == _as_tensor(tokens).shape):
        raise ValueError("paired bootstrap: both models must be scored on the same records")
    return bootstrap_ci(a - b, tokens, resamples=resamples, level=level, seed=seed)


def heldout_records(evaluation: dict | None) -> tuple[list[float], list[int]]:
    """(per-record loss sums, per-record scored tokens) of an evaluation dict; empty if absent."""
    records = ((evaluation or {}).get("heldout") or {}).get("records") or {}
    return list(records.get("loss_sum") or []), list(records.get("tokens") or [])


def on_common_records(evaluations: Sequence[dict]) -> list[dict]:
    """``evaluations`` restricted to the held-out records every one of them scored (a run's
    evaluations before the last round may score only the first records, ``eval_every_samples``):
    loss and per-record sums on those records alone, so that they compare and pair on one set.
    Evaluations that already scored the same records are returned as they are."""
    if not all((e["heldout"].get("records") or {}).get("tokens") for e in evaluations):
        return list(evaluations)  # written without per-record sums: nothing to restrict by
    scored = []
    for e in evaluations:
        records = e["heldout"]["records"]
        index = records.get("index") or list(range(len(records["tokens"])))
        scored.append(dict(zip(index, zip(records["loss_sum"], records["tokens"]))))
    if all(d.keys() == scored[0].keys() for d in scored):
        return list(evaluations)
    common = sorted(set.intersection(*(set(d) for d in scored)))
    out = []
    for e, d in zip(evaluations, scored):
        loss_sum, tokens = [d[i][0] for i in common], [d[i][1] for i in common]
        heldout = {"loss": sum(loss_sum) / sum(tokens), "n_records": len(common), "n_tokens": sum(tokens),
                   "records": {"index": common, "loss_sum": loss_sum, "tokens": tokens}}  # fmt: skip
        out.append(e | {"heldout": heldout})
    return out


def heldout_comparison(evaluation: dict, references: dict[str, dict | None], *, seed: int = 0) -> dict:
    """A model's held-out loss with its interval, and its paired difference to each reference model
    (``{"base": ..., "flora": ...}`` gives ``delta_vs_base`` and ``delta_vs_base_ci95``, ...)."""
    losses, tokens = heldout_records(evaluation)
    loss = float(evaluation["heldout"]["loss"])
    out: dict = {"heldout_loss": loss, "heldout_loss_ci95": list(bootstrap_ci(losses, tokens, seed=seed))}
    for name, reference in references.items():
        if reference is None:
            continue
        ref_losses, ref_tokens = heldout_records(reference)
        if ref_tokens != tokens:
            raise ValueError(f"the {name} model was scored on other held-out records")
        out[f"delta_vs_{name}"] = loss - float(reference["heldout"]["loss"])
        out[f"delta_vs_{name}_ci95"] = list(paired_bootstrap_ci(losses, ref_losses, tokens, seed=seed))
    return out
