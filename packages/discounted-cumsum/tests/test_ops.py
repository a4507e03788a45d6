"""torch.library integration: opcheck, torch.compile(fullgraph=True), fake tensors."""

from __future__ import annotations

import pytest
import torch

from altgrad.discounted_cumsum import discounted_cumsum, discounted_returns, generalized_advantage_estimate

OP = torch.ops.altgrad_discounted_cumsum.scan


def _samples():
    x = torch.randn(3, 9, 2, dtype=torch.float64, requires_grad=True)
    g_row = torch.rand(3, 1, 2, dtype=torch.float64, requires_grad=True)
    g_elem = torch.rand(3, 9, 2, dtype=torch.float64, requires_grad=True)
    dones = torch.rand(3, 9, 2) < 0.2
    init = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    yield (x, None, 0.9, None, None, 1, False)
    yield (x, g_row, 0.0, None, None, 1, True)
    yield (x, g_elem, 0.0, dones, init, 1, False)
    yield (x, None, 0.5, dones, init, 1, True)
    yield (torch.randn(4, 33, requires_grad=True), None, 0.99, None, None, 1, True)
    yield (torch.randn(5, 6, dtype=torch.float64, requires_grad=True), None, 0.9, None, None, 0, False)


@pytest.mark.parametrize("args", list(_samples()))
def test_opcheck(args):
    torch.library.opcheck(OP, args)


def test_compile_fullgraph_forward_and_backward():
    def loss(x, g, dones):
        y = discounted_cumsum(x, g, dim=1, reverse=True, dones=dones, initial=0.5)
        return (y * y).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.full((4,), 0.9, requires_grad=True)
    dones = torch.rand(4, 16) < 0.1
    got = compiled(x, g, dones)
    gx, gg = torch.autograd.grad(got, (x, g))
    want = loss(x, g, dones)
    wx, wg = torch.autograd.grad(want, (x, g))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gg, wg)


def test_compile_inductor_rl_helpers():
    def f(r, v, d):
        return discounted_returns(r, 0.99, dones=d, dim=0), generalized_advantage_estimate(
            r, v, 0.99, 0.95, d, dim=0
        )

    compiled = torch.compile(f, fullgraph=True)
    r, v, d = torch.randn(32, 8), torch.randn(32, 8), torch.rand(32, 8) < 0.05
    for a, b in zip(compiled(r, v, d), f(r, v, d)):
        torch.testing.assert_close(a, b)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 7, dtype=torch.bfloat16)
        y = discounted_cumsum(x, 0.9, dim=0)
        assert y.shape == (5, 7)
        assert y.dtype == torch.bfloat16


def test_meta_device_uses_fake_kernel():
    y = discounted_cumsum(torch.empty(2, 3, device="meta"), 0.5)
    assert y.device.type == "meta"
    assert y.shape == (2, 3)
