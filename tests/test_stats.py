"""florist.stats: bootstrap intervals of token-weighted losses, against closed-form standard errors."""

from __future__ import annotations

import math

import pytest
import torch

from florist.stats import bootstrap_ci, paired_bootstrap_ci, weighted_mean


def records(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(20, 200, (n,), generator=g).double()
    per_token = 2.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return per_token * tokens, tokens


def delta_method_se(loss_sums: torch.Tensor, tokens: torch.Tensor) -> float:
    """The textbook standard error of a ratio estimator Σy / Σw (linearisation)."""
    n = len(tokens)
    ratio = loss_sums.sum() / tokens.sum()
    residual = loss_sums - ratio * tokens
    return float(math.sqrt(n / (n - 1) * (residual**2).sum()) / tokens.sum())


def test_bootstrap_interval_matches_the_delta_method() -> None:
    loss_sums, tokens = records(2000, seed=1)
    low, high = bootstrap_ci(loss_sums.tolist(), tokens.tolist(), seed=3)
    mean = weighted_mean(loss_sums.tolist(), tokens.tolist())
    assert low < mean < high
    half = 1.959964 * delta_method_se(loss_sums, tokens)
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * half)


def test_paired_interval_removes_shared_variance() -> None:
    loss_sums, tokens = records(500, seed=2)
    g = torch.Generator().manual_seed(5)
    # Model b is model a plus a small per-record change: a paired difference is tightly known.
    shift = (-0.03 + 0.01 * torch.randn(500, generator=g, dtype=torch.float64)) * tokens
    better = loss_sums + shift
    low, high = paired_bootstrap_ci(better.tolist(), loss_sums.tolist(), tokens.tolist())
    true = float(shift.sum() / tokens.sum())
    assert low < true < high < 0
    residual = shift - true * tokens
    se = float(math.sqrt(500 / 499 * (residual**2).sum()) / tokens.sum())
    assert (high - low) / 2 == pytest.approx(1.959964 * se, rel=0.15)
    unpaired = bootstrap_ci(better.tolist(), tokens.tolist())
    assert (high - low) < 0.2 * (unpaired[1] - unpaired[0])
    # Identical models differ by exactly zero in every resample.
    assert paired_bootstrap_ci(loss_sums.tolist(), loss_sums.tolist(), tokens.tolist()) == (0.0, 0.0)


def test_bootstrap_is_seeded_and_checks_its_input() -> None:
    loss_sums, tokens = records(50, seed=3)
    assert bootstrap_ci(loss_sums.tolist(), tokens.tolist(), seed=7) == bootstrap_ci(
        loss_sums.tolist(), tokens.tolist(), seed=7
    )
    with pytest.raises(ValueError, match="same records"):
        paired_bootstrap_ci([1.0, 2.0], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([1.0, float("nan")], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([], [])
