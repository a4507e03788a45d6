"""The torch-discounted-cumsum README examples, with only the import changed (and .cuda() dropped without a GPU)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

EXAMPLE_1 = """
import torch
from altgrad.discounted_cumsum import discounted_cumsum_right

N = 8
gamma = 0.99
x = torch.ones(1, N).cuda()
y = discounted_cumsum_right(x, gamma)

print(y)
"""

EXAMPLE_2 = """
import torch
from altgrad.discounted_cumsum import discounted_cumsum_right

N = 8
K = 2
gamma = 0.99
x = torch.ones(1, N).cuda()
y_N = discounted_cumsum_right(x, gamma)
y_K = y_N - (gamma ** K) * torch.cat((y_N[:, K:], torch.zeros(1, K).cuda()), dim=1)

print(y_K)
"""

EXPECTED = {
    EXAMPLE_1: [7.7255, 6.7935, 5.8520, 4.9010, 3.9404, 2.9701, 1.9900, 1.0000],
    EXAMPLE_2: [1.9900, 1.9900, 1.9900, 1.9900, 1.9900, 1.9900, 1.9900, 1.0000],
}


def _run(code: str) -> torch.Tensor:
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(code, scope)
    assert "tensor([[" in out.getvalue()
    return scope["y"] if "y_K" not in scope else scope["y_K"]


@pytest.mark.parametrize("code", [EXAMPLE_1, EXAMPLE_2])
def test_readme_example_on_cpu(code):
    y = _run(code.replace(".cuda()", ""))
    torch.testing.assert_close(y, torch.tensor([EXPECTED[code]]), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("code", [EXAMPLE_1, EXAMPLE_2])
def test_readme_example_unchanged_on_cuda(code):
    y = _run(code)
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), torch.tensor([EXPECTED[code]]), atol=1e-4, rtol=0)
