"""The native kernels against the pure-torch reference, for every argument form."""

from __future__ import annotations

import itertools

import pytest
import torch

from altgrad.discounted_cumsum import (
    cpu_available,
    discounted_cumsum,
    discounted_cumsum_left,
    discounted_cumsum_reference,
    discounted_cumsum_right,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _row_shape(shape, dim):
    dim %= len(shape)
    return shape[:dim] + shape[dim + 1 :]


def _gammas(shape, dim):
    """Every accepted form of gamma for x of `shape`."""
    n = shape[dim]
    yield "float", 0.9
    yield "0-d", torch.tensor(0.8, dtype=torch.float64)
    yield "per-row", torch.rand(_row_shape(shape, dim), dtype=torch.float64) * 0.5 + 0.5
    yield "per-element", torch.rand(shape, dtype=torch.float64)
    per_step = [1] * len(shape)
    per_step[dim] = n
    yield "per-step", torch.rand(per_step, dtype=torch.float64)


def _as64(g):
    return g.double() if isinstance(g, torch.Tensor) else g


def test_native_module_is_built():
    assert cpu_available()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "dim"), [((3, 50), -1), ((4, 33, 5), 1), ((70, 3), 0), ((2, 3, 37), 2), ((41,), 0)]
)
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_reference(dtype, shape, dim, reverse, close):
    x = torch.randn(shape, dtype=dtype)
    dones = torch.rand(shape) < 0.15
    for (_name, g), d, init in itertools.product(_gammas(shape, dim), [None, dones], [None, 1.5]):
        got = discounted_cumsum(x, g, dim=dim, reverse=reverse, dones=d, initial=init)
        want = discounted_cumsum_reference(
            x.double(), _as64(g), dim=dim, reverse=reverse, dones=d, initial=init
        )
        assert got.dtype == dtype
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100, 1000, 4099])
def test_row_lengths_around_vector_widths(dtype, reverse, n, close):
    x = torch.randn(3, n, dtype=dtype)
    got = discounted_cumsum(x, 0.97, reverse=reverse, initial=torch.tensor([0.0, 1.0, -2.0]))
    want = discounted_cumsum_reference(
        x.double(), 0.97, reverse=reverse, initial=torch.tensor([0.0, 1.0, -2.0])
    )
    close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["scalar", "per-element", "dones"])
def test_long_rows_split_over_threads(dtype, reverse, kind, close):
    """Rows long enough for the chunked parallel scan (chunks chained by their carries)."""
    n = 300_001
    x = torch.randn(2, n, dtype=dtype)
    g = 0.9999 if kind == "scalar" else torch.rand(2, n, dtype=torch.float64) * 0.01 + 0.99
    dones = (torch.rand(2, n) < 1e-4) if kind == "dones" else None
    old = torch.get_num_threads()
    torch.set_num_threads(4)  # more threads than rows, even on a 2-core machine
    try:
        got = discounted_cumsum(
            x[:1],
            g if kind == "scalar" else g[:1],
            reverse=reverse,
            dones=None if dones is None else dones[:1],
            initial=3.0,
        )
    finally:
        torch.set_num_threads(old)
    want = _loop64(
        x[:1].double(),
        g if kind == "scalar" else g[:1].double(),
        dones if dones is None else dones[:1],
        3.0,
        reverse,
    )
    close(got, want, dtype)


def _loop64(x, g, dones, init, reverse):
    """A float64 loop over a single long row (fast enough for 3e5 steps in plain Python lists)."""
    xs = x[0].tolist()
    gs = [g] * len(xs) if not isinstance(g, torch.Tensor) else g[0].tolist()
    ds = [False] * len(xs) if dones is None else dones[0].tolist()
    out = [0.0] * len(xs)
    prev = init
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    for t in order:
        prev = xs[t] if ds[t] else xs[t] + gs[t] * prev
        out[t] = prev
    return torch.tensor(out, dtype=torch.float64).unsqueeze(0)


def test_scalar_gamma_with_many_rows_reads_no_garbage():
    """The peer reads gamma[i] for every row i when gamma is a scalar (out of bounds for B > 1)."""
    x = torch.ones(64, 10)
    y = discounted_cumsum_right(x, 0.5)
    want = discounted_cumsum_reference(x[:1].double(), 0.5, reverse=True).float().expand(64, 10)
    # exact: dyadic values (sums of 0.5^k, k < 10): every route computes them exactly
    assert torch.equal(y, want)
    y = discounted_cumsum_right(x, torch.tensor([0.5]))
    assert torch.equal(y, want)  # exact: as above


def test_precision_against_the_peers_figure():
    """10 000 ones, gamma 0.99, float32: max error vs float64 at most 9.9e-5 (the peer's parallel result)."""
    x = torch.ones(1, 10_000)
    for fn in (discounted_cumsum_right, discounted_cumsum_left):
        err = (fn(x, 0.99).double() - fn(x.double(), 0.99)).abs().max().item()
        assert err <= 9.9e-5, err
    err = (
        (discounted_cumsum(x.T, 0.99, dim=0).double() - discounted_cumsum(x.T.double(), 0.99, dim=0))
        .abs()
        .max()
    )
    assert err.item() <= 9.9e-5


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_non_contiguous_inputs(dim, close):
    base = torch.randn(6, 9, 10)
    x = base.transpose(0, 2)[::2]  # strided, non-contiguous
    g = torch.rand(x.shape, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    got = discounted_cumsum(x, g, dim=dim, reverse=True)
    want = discounted_cumsum_reference(x.double(), g, dim=dim, reverse=True)
    assert not x.is_contiguous()
    close(got, want, torch.float32)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (3, 0, 2)])
def test_empty(shape):
    x = torch.randn(shape)
    for dim in range(len(shape)):
        y = discounted_cumsum(x, 0.5, dim=dim, initial=1.0)
        assert y.shape == x.shape
        assert y.dtype == x.dtype


def test_zero_dim_and_length_one():
    # exact: by construction: a length-one scan returns x
    assert discounted_cumsum(torch.tensor(3.0), 0.5).item() == 3.0
    x = torch.randn(4, 1)
    assert torch.equal(discounted_cumsum(x, 0.5), x)  # exact: by construction: a length-one scan returns x
    assert torch.allclose(discounted_cumsum(x, 0.5, initial=2.0), x + 1.0)


def test_known_values():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(discounted_cumsum_right(x, 0.5), torch.tensor([[2.75, 3.5, 3.0]]))
    assert torch.allclose(discounted_cumsum_left(x, 0.5), torch.tensor([[1.0, 2.5, 4.25]]))
    dones = torch.tensor([[False, True, False]])
    assert torch.allclose(
        discounted_cumsum(x, 0.5, reverse=True, dones=dones, initial=4.0), torch.tensor([[2.0, 2.0, 5.0]])
    )
    assert torch.allclose(
        discounted_cumsum(x, 0.5, dones=dones, initial=4.0), torch.tensor([[3.0, 2.0, 4.0]])
    )


def test_per_row_gamma_matches_peer_semantics():
    x = torch.ones(3, 4)
    g = torch.tensor([0.0, 0.5, 1.0])
    y = discounted_cumsum_right(x, g)
    assert torch.allclose(y[0], torch.ones(4))
    assert torch.allclose(y[1], torch.tensor([1.875, 1.75, 1.5, 1.0]))
    assert torch.allclose(y[2], torch.tensor([4.0, 3.0, 2.0, 1.0]))


def test_nan_and_inf_propagate():
    x = torch.tensor([[1.0, float("nan"), 1.0, 1.0] + [1.0] * 40, [1.0, float("inf"), 1.0, 1.0] + [1.0] * 40])
    y = discounted_cumsum_left(x, 0.5)
    assert not y[0, 0].isnan()
    assert y[0, 1:].isnan().all()
    assert y[1, 0].isfinite()
    assert (y[1, 1:] == float("inf")).all()  # exact: a non-finite carry, no rounding
    y = discounted_cumsum_right(x, 0.5)
    assert y[0, :2].isnan().all()
    assert not y[0, 2:].isnan().any()


def test_threads_do_not_change_results():
    x = torch.randn(37, 5000)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = discounted_cumsum(x, 0.99, reverse=True)
        torch.set_num_threads(3)
        three = discounted_cumsum(x, 0.99, reverse=True)
    finally:
        torch.set_num_threads(old)
    # exact: by construction: rows under 2^18 elements are scanned whole by one thread each
    assert torch.equal(one, three)


def test_time_major_and_batch_major_agree():
    x = torch.randn(128, 33)
    a = discounted_cumsum(x, 0.95, dim=0, reverse=True)
    b = discounted_cumsum(x.T.contiguous(), 0.95, dim=1, reverse=True).T
    assert torch.allclose(a, b, atol=1e-5)
