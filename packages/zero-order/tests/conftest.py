"""Shared helpers for the zero-order tests."""

import os
import sys

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


# Test helpers (`_bounds`) live next to the tests; with --import-mode=importlib the folder is not on sys.path.
sys.path.insert(0, os.path.dirname(__file__))
