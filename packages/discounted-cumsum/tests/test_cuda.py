"""CUDA kernels against the CPU results (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from altgrad.discounted_cumsum import (
    cuda_available,
    discounted_cumsum,
    discounted_cumsum_reference,
    discounted_cumsum_right,
    generalized_advantage_estimate,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def test_cuda_module_was_built():
    assert cuda_available(), "a GPU is present but the CUDA module was not built (see docs: ALTGRAD_CUDA=1)"


def _cpu64(x, g, **kw):
    g64 = g.double().cpu() if isinstance(g, torch.Tensor) else g
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return discounted_cumsum(x.double().cpu(), g64, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((1, 100_000), -1),
        ((64, 10_000), -1),
        ((70_000, 3), -1),
        ((3, 2049), 1),
        ((1, 1), -1),
        ((256, 64), 0),
        ((5, 7, 9), 1),
    ],
)
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_cpu(dtype, shape, dim, reverse, close):
    x = torch.randn(shape, dtype=dtype, device="cuda")
    dones = torch.rand(shape, device="cuda") < 0.01
    d = dim % len(shape)
    per_row = torch.rand(shape[:d] + shape[d + 1 :], dtype=torch.float64, device="cuda") * 0.1 + 0.9
    per_elem = torch.rand(shape, dtype=torch.float64, device="cuda") * 0.1 + 0.9
    init = torch.randn(shape[:d] + shape[d + 1 :], device="cuda")
    for g, dn, ini in [
        (0.99, None, None),
        (per_row, None, init),
        (per_elem, dones, None),
        (0.9, dones, init),
    ]:
        got = discounted_cumsum(x, g, dim=dim, reverse=reverse, dones=dn, initial=ini)
        assert got.is_cuda
        assert got.dtype == dtype
        close(got, _cpu64(x, g, dim=dim, reverse=reverse, dones=dn, initial=ini), dtype)


@pytest.mark.parametrize("n", [2**20 + 3, 2**24])
def test_one_huge_row(n, close):
    x = torch.randn(1, n, device="cuda")
    close(discounted_cumsum_right(x, 0.999), _cpu64(x, 0.999, dim=1, reverse=True), torch.float32)


def test_precision_against_the_peers_figure():
    x = torch.ones(1, 10_000, device="cuda")
    err = (
        discounted_cumsum_right(x, 0.99).double().cpu() - discounted_cumsum_right(x.double().cpu(), 0.99)
    ).abs()
    assert err.max().item() <= 9.9e-5


def test_repeated_calls_and_growing_workspace(close):
    for n in [10, 5000, 100, 300_000, 7]:
        x = torch.randn(4, n, device="cuda")
        close(discounted_cumsum(x, 0.95), _cpu64(x, 0.95), torch.float32)


def test_runs_on_the_current_stream(close):
    s = torch.cuda.Stream()
    x = torch.randn(8, 50_000, device="cuda")
    with torch.cuda.stream(s):
        y = discounted_cumsum(x, 0.97, reverse=True)
    s.synchronize()
    close(y, _cpu64(x, 0.97, reverse=True), torch.float32)


def test_gradients_match_cpu():
    x = torch.randn(6, 300, dtype=torch.float64, device="cuda", requires_grad=True)
    g = (torch.rand(6, 300, dtype=torch.float64, device="cuda") * 0.5 + 0.5).requires_grad_()
    dones = torch.rand(6, 300, device="cuda") < 0.05
    w = torch.randn(6, 300, dtype=torch.float64, device="cuda")
    grads = torch.autograd.grad((discounted_cumsum(x, g, dones=dones, initial=1.0) * w).sum(), (x, g))
    xc, gc = x.detach().cpu().requires_grad_(), g.detach().cpu().requires_grad_()
    want = torch.autograd.grad(
        (discounted_cumsum_reference(xc, gc, dones=dones.cpu(), initial=1.0) * w.cpu()).sum(), (xc, gc)
    )
    for a, b in zip(grads, want):
        torch.testing.assert_close(a.cpu(), b)


def test_opcheck_and_compile_on_cuda():
    x = torch.randn(4, 33, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.altgrad_discounted_cumsum.scan, (x, None, 0.9, None, None, 1, True))
    f = torch.compile(lambda r, v: generalized_advantage_estimate(r, v, 0.99, 0.95, dim=0), fullgraph=True)
    r, v = torch.randn(64, 16, device="cuda"), torch.randn(64, 16, device="cuda")
    torch.testing.assert_close(
        f(r, v).cpu(), generalized_advantage_estimate(r.cpu(), v.cpu(), 0.99, 0.95, dim=0)
    )


def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="`gamma`"):
        discounted_cumsum(torch.randn(2, 3, device="cuda"), torch.rand(2, 3))
