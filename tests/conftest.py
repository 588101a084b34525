"""Shared test helpers: the reference fixtures (IEIT's material, outside the repository) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixtures_dir() -> Path:
    """`../shared/fixtures`; skipped when absent (a plain clone), a failure under CI (which has it)."""
    if not FIXTURES.is_dir():
        reason = f"reference fixtures not found at {FIXTURES} (IEIT's material, not in the repository)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide them")
        pytest.skip(reason)
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
