"""CUDA kernels against the CPU results (skipped without a GPU).

Run on a CUDA machine with ``pytest packages/discounted-cumsum/tests/test_cuda.py`` (``nox -s gpu`` does). The
largest case allocates about 9 GiB of host memory and 3 GiB of GPU memory (a 2^28-element float32 row, its float64
copies for the CPU reference). Tolerances: ``close`` (conftest) compares with TOL[dtype] * (max|ref| + 1), the
output dtype's rounding plus the float32 accumulation of a scan (see conftest and test_differential's bound).
"""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("n", [2**20 + 3, 2**24, 2**28])
def test_one_huge_row(n, close):
    x = torch.randn(1, n, device="cuda")
    got = discounted_cumsum_right(x, 0.999)
    want = _cpu64(x, 0.999, dim=1, reverse=True)
    close(got, want, torch.float32)
    del got, want, x
    torch.cuda.empty_cache()


@pytest.mark.parametrize("reverse", [False, True])
def test_long_float32_row_accuracy(reverse):
    """Ones at gamma = 0.999999, 2^24 steps: exact value (1 - g^(k+1)) / (1 - g); the kernel accumulates in double,
    so the only error is the final rounding to float32 (u = 2^-24 relative) plus double error (n * 2^-53)."""
    n, g = 2**24, 0.999999
    k = torch.arange(n, dtype=torch.float64, device="cuda")
    want = -torch.expm1((k + 1) * math.log(g)) / (1 - g)
    if reverse:
        want = want.flip(0)
    y = discounted_cumsum(torch.ones(n, device="cuda"), g, reverse=reverse)
    assert ((y.double() - want).abs().max() / want.abs().max()).item() <= 2 * 2.0**-24


@pytest.mark.parametrize("rows", [65_536, 131_073])
@pytest.mark.parametrize("n", [1, 5, 300])
def test_many_rows(rows, n, close):
    """More rows than CUDA's 65 535 grid-y limit (the peer's limit), short and medium rows."""
    x = torch.randn(rows, n, device="cuda")
    g = torch.rand(rows, dtype=torch.float64, device="cuda") * 0.2 + 0.8
    dones = torch.rand(rows, n, device="cuda") < 0.05
    init = torch.randn(rows, device="cuda")
    close(
        discounted_cumsum(x, g, reverse=True, dones=dones, initial=init),
        _cpu64(x, g, reverse=True, dones=dones, initial=init),
        torch.float32,
    )


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [100, 2**20])
def test_nan_and_inf_never_cross_a_reset(reverse, n):
    """A NaN/inf early in scan order, a reset later (often in another tile): the same NaN/inf positions as the
    CPU kernel, and finite values equal to the CPU's within float32 accuracy."""
    x = torch.rand(4, n, device="cuda")
    early = [n - 3, n - 2, n - 1] if reverse else [0, 1, 2]
    x[0, early[0]], x[1, early[1]], x[2, early[2]] = float("nan"), float("inf"), -float("inf")
    dones = torch.zeros(4, n, dtype=torch.bool, device="cuda")
    dones[:, n // 3 if reverse else 2 * n // 3] = True
    gam = torch.full((4, n), 0.9, device="cuda")
    gam[3, n // 2] = 0.0  # a zero discount cuts too
    x[3, early[0]] = float("nan")
    for g in (0.9, gam):
        got = discounted_cumsum(x, g, reverse=reverse, dones=dones, initial=float("nan")).double().cpu()
        want = _cpu64(x, g, reverse=reverse, dones=dones, initial=float("nan"))
        assert torch.equal(got.isnan(), want.isnan())  # exact: bool masks
        assert torch.equal(got.isinf(), want.isinf())  # exact: bool masks
        fin = want.isfinite()
        assert fin.sum() > 0
        assert (got[fin] - want[fin]).abs().max().item() <= 2e-5 * (want[fin].abs().max().item() + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_lazy_views(dtype, close):
    base = torch.randn(40, 30, 6, device="cuda", dtype=dtype)
    views = {
        "transposed": base.transpose(0, 1),
        "sliced": base[::2, 3:, ::3],
        "expanded": base[:, :1].expand(40, 30, 6),
        "neg-bit": (-base.float()).to(dtype)._neg_view(),
    }
    if dtype in (torch.float32, torch.float64):
        z = torch.complex(torch.zeros_like(base), -base)
        views["conj-imag"] = z.conj().imag
    for _name, x in views.items():
        for dim in (0, 1, -1):
            got = discounted_cumsum(x, 0.95, dim=dim, reverse=True, initial=1.0)
            close(got, _cpu64(x, 0.95, dim=dim, reverse=True, initial=1.0), dtype)


def test_streams_and_events(close):
    """Two non-default streams running concurrently (each its own workspace), and ordering through events."""
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    xs = [torch.randn(3, 200_000, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    outs = []
    for _ in range(3):
        with torch.cuda.stream(s1):
            y1 = discounted_cumsum(xs[0], 0.99)
        with torch.cuda.stream(s2):
            y2 = discounted_cumsum(xs[1], 0.98, reverse=True)
        outs.append((y1, y2))
    torch.cuda.synchronize()
    for y1, y2 in outs:
        close(y1, _cpu64(xs[0], 0.99), torch.float32)
        close(y2, _cpu64(xs[1], 0.98, reverse=True), torch.float32)
    # produced on one stream, consumed on another after an event
    ev = torch.cuda.Event()
    with torch.cuda.stream(s1):
        x = torch.randn(2, 50_000, device="cuda") * 2
        ev.record()
    with torch.cuda.stream(s2):
        s2.wait_event(ev)
        y = discounted_cumsum(x, 0.9)
    s2.synchronize()
    close(y, _cpu64(x, 0.9), torch.float32)


def test_cuda_graph_capture_and_replay(close):
    x = torch.randn(8, 10_000, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        discounted_cumsum(x, 0.97, reverse=True)  # warm-up: allocates this stream's workspace
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):  # capture on the warmed-up stream: its workspace is reused
        y = discounted_cumsum(x, 0.97, reverse=True)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        close(y, _cpu64(x, 0.97, reverse=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_per_row_and_per_element_match_cpu(dtype):
    for g_shape in [(5,), (5, 700), (1, 700)]:
        x = torch.randn(5, 700, dtype=dtype, device="cuda", requires_grad=True)
        g = (torch.rand(g_shape, dtype=dtype, device="cuda") * 0.5 + 0.5).requires_grad_()
        init = torch.randn(5, dtype=dtype, device="cuda", requires_grad=True)
        dones = torch.rand(5, 700, device="cuda") < 0.02
        w = torch.randn(5, 700, dtype=dtype, device="cuda")
        got = torch.autograd.grad(
            (discounted_cumsum(x, g, reverse=True, dones=dones, initial=init) * w).sum(), (x, g, init)
        )
        leaves = [t.detach().cpu().double().requires_grad_() for t in (x, g, init)]
        want = torch.autograd.grad(
            (
                discounted_cumsum_reference(
                    leaves[0], leaves[1], reverse=True, dones=dones.cpu(), initial=leaves[2]
                )
                * w.cpu().double()
            ).sum(),
            leaves,
        )
        for a, b in zip(got, want):
            # float32: a sum of <= 700 * 5 terms |lambda y| <= ~1e3 each, accumulated in double then rounded:
            # relative 2^-24 of the largest gradient plus 4e-6 absolute slack per unit of it
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            assert (a.double().cpu() - b).abs().max().item() <= tol * (b.abs().max().item() + 1)


def test_compile_with_dones_initial_and_backward():
    def f(r, g, d, b):
        return discounted_cumsum(r, g, dim=0, reverse=True, dones=d, initial=b)

    cf = torch.compile(f, fullgraph=True)
    r = torch.randn(128, 16, device="cuda", requires_grad=True)
    g = torch.full((16,), 0.97, device="cuda", requires_grad=True)
    d = torch.rand(128, 16, device="cuda") < 0.05
    b = torch.randn(16, device="cuda")
    y = cf(r, g, d, b)
    ye = f(r, g, d, b)
    # exact: same route; the same kernel on the same inputs
    torch.testing.assert_close(y, ye, rtol=0, atol=0)  # the same kernel on the same inputs
    # gradients: the compiled graph may sum grad_gamma = sum_t lambda_t y_(t-1) (128 terms) in another order, so the
    # two float32 sums differ by at most 2 * 128 u of their magnitude (u = 2^-24)
    for a, b in zip(torch.autograd.grad(y.sum(), (r, g)), torch.autograd.grad(ye.sum(), (r, g))):
        assert (a - b).abs().max().item() <= 256 * 2.0**-24 * (b.abs().max().item() + 1)


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


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_rl_estimators_on_cuda_match_the_cpu_kernel(mode, close):
    """Without a gradient both devices run a fused kernel (CUDA: csrc/cuda/rl.cu; CPU: csrc/cpu/rl_kernel.h)."""
    from altgrad.discounted_cumsum import _rl

    shape = (8, 700, 3)
    r, v, nv, lp, lm = (torch.randn(shape, dtype=torch.float64) for _ in range(5))
    done = torch.rand(shape) < 0.05
    term = done & (torch.rand(shape) < 0.5)
    g = 0.9 + 0.1 * torch.rand(shape, dtype=torch.float64)
    kw = {"log_pi": lp, "log_mu": lm, "rho_bar": 1.0, "c_bar": 0.9} if mode == 2 else {}
    want = _rl.estimate(mode, r, v, nv, g, 0.95, done, term, dim=1, **kw)
    cuda = {k: t.cuda() if isinstance(t, torch.Tensor) else t for k, t in kw.items()}
    got = _rl.estimate(
        mode, r.cuda(), v.cuda(), nv.cuda(), g.cuda(), 0.95, done.cuda(), term.cuda(), dim=1, **cuda
    )
    for a, b in zip(got, want):
        assert a.device.type == "cuda"
        close(a, b, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# The fused RL estimators' CUDA kernel (csrc/cuda/rl.cu) against the composed route (torch ops over the scan, taken
# when a gradient is needed) on the GPU and against the CPU kernel on the same inputs copied to the CPU, within the
# error bound derived in conftest.py (rl_helpers.bound).
# ---------------------------------------------------------------------------------------------------------------

RL_DTYPES = [torch.float64, torch.float32, torch.bfloat16]
RL_LAYOUTS = [((16, 300), -1), ((40, 7, 5), 1), ((300, 33), 0)]


@pytest.fixture
def cuda_route(monkeypatch):
    """Counts the calls of `_rl._fused_cuda` (the CUDA kernel's route)."""
    from altgrad.discounted_cumsum import _rl

    calls = []
    real = _rl._fused_cuda

    def spy(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(_rl, "_fused_cuda", spy)
    return calls


def _three_routes(h, kw, cuda_route):
    """(CUDA kernel, composed route on CUDA, CPU kernel) for the arguments `kw` (on the CPU)."""
    from altgrad.discounted_cumsum import _rl

    gkw = h.to(kw, "cuda")
    before = len(cuda_route)
    with torch.no_grad():
        got = _rl.estimate(**gkw)
    assert len(cuda_route) == before + 1, "no gradient needed: the CUDA kernel should run"
    # a reward that needs a gradient sends the call to the composed route
    reward = gkw["reward"].clone().requires_grad_()
    with torch.enable_grad():
        composed = _rl.estimate(**{**gkw, "reward": reward})
    assert len(cuda_route) == before + 1, "a gradient is needed: the composed route should run"
    composed = tuple(None if t is None else t.detach() for t in composed)
    with torch.no_grad():
        want_cpu = _rl.estimate(**kw)
    for t in got:
        assert t is None or t.is_cuda
    return got, composed, want_cpu


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", RL_DTYPES)
@pytest.mark.parametrize(("shape", "dim"), RL_LAYOUTS)
def test_rl_kernel_matches_composed_and_cpu(mode, dtype, shape, dim, cuda_route, rl_helpers):
    """Every combination of rates (number, per row, per element), flags and next values / bootstrap."""
    for rates in ("number", "per_row", "per_elem"):
        for flags in ("none", "done", "terminated", "both"):
            for nxt in ("shifted", "next_value", "bootstrap"):
                kw = rl_helpers.inputs(mode, shape, dim, dtype, rates, flags, nxt)
                got, composed, want_cpu = _three_routes(rl_helpers, kw, cuda_route)
                rl_helpers.check(got, composed, rl_helpers.bound(kw, dtype, composed))
                rl_helpers.check(got, want_cpu, rl_helpers.bound(kw, dtype, want_cpu))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_rl_kernel_float16(mode, cuda_route, rl_helpers):
    kw = rl_helpers.inputs(mode, (12, 200), -1, torch.float16, "per_row", "both", "bootstrap")
    got, composed, want_cpu = _three_routes(rl_helpers, kw, cuda_route)
    rl_helpers.check(got, composed, rl_helpers.bound(kw, torch.float16, composed))
    rl_helpers.check(got, want_cpu, rl_helpers.bound(kw, torch.float16, want_cpu))


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize(("shape", "dim"), [((6, 50), -1), ((50, 6), 0)])
@pytest.mark.parametrize("nxt", ["shifted", "next_value"])
def test_rl_kernel_nan_after_a_terminal_step_does_not_leak(mode, shape, dim, nxt, cuda_route, rl_helpers):
    """A terminal step at t0 of every sequence, a NaN value (and next value) right after it: nothing at or before
    t0 is NaN, and the NaN positions after it are the composed and CPU routes' ones."""
    d = dim % len(shape)
    t0 = 20
    kw = rl_helpers.inputs(mode, shape, dim, torch.float32, "per_row", "done", nxt)
    kw["terminated"] = torch.zeros(shape, dtype=torch.bool)
    kw["terminated"].narrow(d, t0, 1).fill_(True)
    kw["value"].narrow(d, t0 + 1, 1).fill_(float("nan"))
    if kw["next_value"] is not None:
        kw["next_value"].narrow(d, t0, 1).fill_(float("nan"))
    got, composed, want_cpu = _three_routes(rl_helpers, kw, cuda_route)
    for out in got:
        assert out.narrow(d, 0, t0 + 1).isfinite().all()
    rl_helpers.check(got, composed, rl_helpers.bound(kw, torch.float32, composed))
    rl_helpers.check(got, want_cpu, rl_helpers.bound(kw, torch.float32, want_cpu))


@pytest.mark.parametrize(("shape", "dim"), [((6, 50), -1), ((50, 6), 0)])
def test_rl_kernel_vtrace_nan_log_prob_stays_nan(shape, dim, cuda_route, rl_helpers):
    """A NaN log-probability: a NaN ratio, kept NaN by the clipping (never the finite bar), where the composed
    and CPU routes have their NaNs."""
    d = dim % len(shape)
    kw = rl_helpers.inputs(2, shape, dim, torch.float32, "per_row", "both", "next_value")
    kw["log_pi"].narrow(d, 17, 1).fill_(float("nan"))
    got, composed, want_cpu = _three_routes(rl_helpers, kw, cuda_route)
    assert all(out.narrow(d, 17, 1).isnan().all() for out in got)
    rl_helpers.check(got, composed, rl_helpers.bound(kw, torch.float32, composed))
    rl_helpers.check(got, want_cpu, rl_helpers.bound(kw, torch.float32, want_cpu))


def test_rl_kernel_td_lambda_without_values_and_single_outputs(cuda_route, rl_helpers):
    """TD(lambda) from next values alone (no second output), and each estimator with second=False."""
    from altgrad.discounted_cumsum import _rl

    kw = rl_helpers.inputs(1, (9, 130), -1, torch.float32, "number", "both", "next_value")
    kw["value"] = None
    got, composed, want_cpu = _three_routes(rl_helpers, kw, cuda_route)
    assert got[1] is None
    rl_helpers.check(got, composed, rl_helpers.bound(kw, torch.float32, composed))
    rl_helpers.check(got, want_cpu, rl_helpers.bound(kw, torch.float32, want_cpu))
    for mode in (0, 1, 2):
        kw = rl_helpers.inputs(mode, (130, 9), 0, torch.float32, "per_elem", "both", "bootstrap")
        with torch.no_grad():
            one = _rl.estimate(**rl_helpers.to(kw, "cuda"), second=False)
            both = _rl.estimate(**rl_helpers.to(kw, "cuda"))
        assert one[1] is None
        # exact: the same deterministic kernel on the same inputs; the second output does not feed the first
        assert torch.equal(one[0], both[0])


def test_rl_kernel_empty_and_single_step(cuda_route, rl_helpers):
    from altgrad.discounted_cumsum import _rl

    for shape in [(0, 5), (4, 0), (3, 1), (1, 1)]:
        kw = rl_helpers.inputs(0, shape, -1, torch.float32, "number", "done", "bootstrap")
        with torch.no_grad():
            got = _rl.estimate(**rl_helpers.to(kw, "cuda"))
            want = _rl.estimate(**kw)
        for a, b in zip(got, want):
            assert a.shape == shape
            if a.numel():
                # one step: adv = r + gamma * boot - v, one float64 evaluation each side (the same expression on
                # the CPU kernel), rounded to float32 once: within one float32 rounding of each other
                err = (a.double().cpu() - b.double()).abs().max().item()
                assert err <= 2 * 2.0**-24 * (b.double().abs().max().item() + 1)


def test_rl_kernel_runs_on_the_current_stream(cuda_route, rl_helpers):
    """On a side stream (inputs made on it) the result equals the default stream's one, bit for bit."""
    from altgrad.discounted_cumsum import _rl

    kw = rl_helpers.to(
        rl_helpers.inputs(2, (256, 700), -1, torch.float32, "per_row", "both", "shifted"), "cuda"
    )
    with torch.no_grad():
        want = _rl.estimate(**kw)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            got = _rl.estimate(**kw)
        s.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # exact: the same deterministic kernel (no atomics) on the same inputs
    assert len(cuda_route) == 2


def test_rl_routes_on_cuda(cuda_route):
    """Gradients, very long rows with few sequences and compiled code take the composed route."""
    from altgrad.discounted_cumsum import _rl

    r = torch.randn(2, _rl._CUDA_MAX_SERIAL_STEPS + 1, device="cuda")
    v = torch.randn_like(r)
    with torch.no_grad():
        _rl.estimate(0, r, v, None, 0.99, 0.95)
    assert cuda_route == []
    # as many sequences as the limit: the kernel again, whatever the length (shape-only views, no memory)
    many = torch.zeros((), device="cuda").expand(_rl._CUDA_MIN_SEQUENCES, _rl._CUDA_MAX_SERIAL_STEPS + 1)
    assert _rl._cuda_fusable({"reward": many, "value": many}, 0.99, 0.95, None, 1)
    assert not _rl._cuda_fusable({"reward": many[:-1], "value": many[:-1]}, 0.99, 0.95, None, 1)
    r = torch.randn(8, 64, device="cuda", requires_grad=True)
    _rl.estimate(0, r, torch.randn_like(r), None, 0.99, 0.95)
    assert cuda_route == []
    with torch.no_grad():
        _rl.estimate(0, r, torch.randn_like(r), None, 0.99, 0.95)
    assert cuda_route == [0]
