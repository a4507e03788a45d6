"""Compatibility with torch-discounted-cumsum's calling conventions, and the documented numeric differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from altgrad.discounted_cumsum import discounted_cumsum_left, discounted_cumsum_right


def peer_gamma(gamma: float, like: torch.Tensor) -> torch.Tensor:
    """What the peer does with a Python-float discount: torch.tensor(gamma).to(input), i.e. round to input's dtype."""
    return torch.tensor(gamma).to(like)


@pytest.mark.parametrize("fn", [discounted_cumsum_right, discounted_cumsum_left])
def test_peer_keyword_and_gamma_forms(fn):
    x = torch.rand(3, 20)
    want = fn(x, torch.tensor([0.5, 0.9, 0.99]))
    # exact: same route (the same call, by keyword)
    torch.testing.assert_close(fn(input=x, gamma=torch.tensor([0.5, 0.9, 0.99])), want, rtol=0, atol=0)
    # a list is accepted as in the peer (torch.tensor(list)); like a Python float it is kept in double
    want64 = fn(x, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    # exact: same route (a list is the same float64 tensor)
    torch.testing.assert_close(fn(x, [0.5, 0.9, 0.99]), want64, rtol=0, atol=0)
    # exact: same route (the same double)
    torch.testing.assert_close(fn(x, np.float64(0.9)), fn(x, 0.9), rtol=0, atol=0)
    # exact: same route (the same double)
    torch.testing.assert_close(fn(x, np.float32(0.9)), fn(x, float(np.float32(0.9))), rtol=0, atol=0)


def test_python_float_gamma_is_kept_in_double_unlike_the_peer():
    """The documented difference (docs/discounted-cumsum, compatibility): gamma = 0.99 rounded to float32 is
    0.99 + 9.54e-9; over N = 10 000 ones that moves y_0 = sum_k gamma^k by about delta * sum_k k gamma^(k-1)
    = 9.54e-9 * 1e4 * (1 - 0.99^1e4 (1 + 1e4 * 0.01)) = 9.54e-5. Computed here in float64 (no float32 arithmetic),
    so only the rounding of gamma differs; the bound covers float64 rounding (N * 2^-53 * 100 < 1e-10)."""
    x = torch.ones(1, 10_000, dtype=torch.float64)
    ours = discounted_cumsum_right(x, 0.99)
    peer_rounding = discounted_cumsum_right(x, peer_gamma(0.99, torch.ones(1)).double())
    diff = (peer_rounding - ours).abs().max().item()
    assert abs(diff - 9.54e-5) <= 0.01e-5, diff
    # With the peer's rounding our float32 result stays within float32 accuracy of that rounded problem
    # (<= 10 u max|y|, u = 2^-24, see test_isolation), i.e. we reproduce the peer's numbers when given its gamma.
    x32 = torch.ones(1, 10_000)
    got = discounted_cumsum_right(x32, peer_gamma(0.99, x32))
    assert (got.double() - peer_rounding).abs().max().item() <= 10 * 2.0**-24 * 100
