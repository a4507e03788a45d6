"""Shared helpers for the zero-order tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def linear_fn(a: torch.Tensor, c: float = 0.0):
    """f(θ) = a·θ + c, for closed-form checks."""

    def f(theta, *rest, **kwargs):
        return a @ theta + c

    return f
