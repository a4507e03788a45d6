"""Gradients w.r.t. x, gamma and initial: gradcheck in float64 and agreement with autograd through the reference."""

from __future__ import annotations

import pytest
import torch

from altgrad.discounted_cumsum import discounted_cumsum, discounted_cumsum_reference, discounted_cumsum_right

SHAPE, DIM = (3, 7, 4), 1


def _gamma(kind: str) -> torch.Tensor | float:
    if kind == "float":
        return 0.8
    shapes = {
        "0-d": (),
        "per-row": (3, 4),
        "per-element": SHAPE,
        "per-step": (7, 1),
        "broadcast-row": (3, 1, 1),
    }
    return (torch.rand(shapes[kind], dtype=torch.float64) * 0.5 + 0.4).requires_grad_()


GAMMAS = ["float", "0-d", "per-row", "per-element", "per-step", "broadcast-row"]


@pytest.mark.parametrize("kind", GAMMAS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_dones", [False, True])
@pytest.mark.parametrize("with_initial", [False, True])
def test_gradcheck(kind, reverse, with_dones, with_initial):
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    g = _gamma(kind)
    dones = (torch.rand(SHAPE) < 0.2) if with_dones else None
    init = torch.randn(3, 4, dtype=torch.float64, requires_grad=True) if with_initial else None
    inputs = [x] + ([g] if isinstance(g, torch.Tensor) else []) + ([init] if init is not None else [])

    def fn(*args):
        it = iter(args)
        xx = next(it)
        gg = next(it) if isinstance(g, torch.Tensor) else g
        ii = next(it) if init is not None else None
        return discounted_cumsum(xx, gg, dim=DIM, reverse=reverse, dones=dones, initial=ii)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("kind", GAMMAS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_autograd_through_reference(kind, reverse):
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    g = _gamma(kind)
    dones = torch.rand(SHAPE) < 0.2
    init = torch.randn(4, dtype=torch.float64, requires_grad=True)  # broadcast over the rows
    w = torch.randn(SHAPE, dtype=torch.float64)
    leaves = [x, init] + ([g] if isinstance(g, torch.Tensor) else [])
    ours = torch.autograd.grad(
        (discounted_cumsum(x, g, dim=DIM, reverse=reverse, dones=dones, initial=init) * w).sum(), leaves
    )
    ref = torch.autograd.grad(
        (discounted_cumsum_reference(x, g, dim=DIM, reverse=reverse, dones=dones, initial=init) * w).sum(),
        leaves,
    )
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_gradients(dtype):
    x = torch.randn(4, 50, dtype=dtype, requires_grad=True)
    g = torch.full((4,), 0.9, dtype=dtype, requires_grad=True)
    discounted_cumsum_right(x, g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    discounted_cumsum_right(x64, g64).sum().backward()
    assert x.grad.dtype == dtype
    assert g.grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(g.grad.double(), g64.grad, rtol=tol, atol=tol * 50)


def test_second_order():
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.7, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: discounted_cumsum_right(a, b), (x, g))


def test_empty_gradients():
    x = torch.randn(3, 0, requires_grad=True)
    g = torch.rand(3, requires_grad=True)
    discounted_cumsum_right(x, g).sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(g.grad, torch.zeros(3))  # exact: an empty sum is exactly 0
