"""Shared helpers for the discounted-cumsum tests."""

from __future__ import annotations

import pytest
import torch

# Tolerances for comparing a result in `dtype` with a float64 reference, relative to max(|ref|) + 1.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Checks |actual - expected| <= TOL[dtype] * (max|expected| + 1), elementwise, with NaNs matching."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(a.isnan(), e.isnan())  # exact: bool masks
    finite = e.isfinite()
    # exact: ±inf entries carry no rounding
    assert torch.equal(a[~finite & ~e.isnan()], e[~finite & ~e.isnan()])
    scale = e[finite].abs().max().item() + 1.0 if finite.any() else 1.0
    err = (a[finite] - e[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def close():
    """The ``assert_close_rel`` checker (test modules cannot import conftest under --import-mode=importlib)."""
    return assert_close_rel
