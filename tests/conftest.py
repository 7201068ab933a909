"""Shared fixtures. Real data comes from ../shared/data; in CI a missing file is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLORIST_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(relative: str) -> Path:
    """Path to a file under ../shared/data: fail in CI (CI=true), skip elsewhere, if it is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"shared data missing: {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def dolly_dir() -> Path:
    """The paper's Dolly split: dolly/8/local_training_{0..7}.json and global_test.json."""
    return require_shared("dolly/8").parent


@pytest.fixture
def mmlu_subset() -> Path:
    return require_shared("mmlu/mmlu_test_1444.jsonl")
