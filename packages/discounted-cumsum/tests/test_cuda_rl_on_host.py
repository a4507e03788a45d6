"""The CUDA RL kernel's per-sequence code run on the host, against the CPU kernel and the composed route.

``_C_cuda._rl_host`` runs ``rl_sequence`` of csrc/cuda/rl.cu (host and device code: the code each GPU thread runs)
over host buffers, one sequence after another. Reached through ``_rl.estimate`` and ``_rl._fused_cuda`` with only
the launch swapped, so the Python buffers, pointers and layout are the GPU route's too. Needs the CUDA module (built
when nvcc is found at install time), not a GPU; test_cuda.py runs the kernel itself on a GPU. Bounds: conftest.py's
``rl_helpers.bound``.
"""

from __future__ import annotations

import pytest
import torch

from altgrad.discounted_cumsum import _native, _rl

pytestmark = pytest.mark.skipif(
    _native._cuda is None or not hasattr(_native._cuda, "_rl_host"),
    reason="needs the CUDA module (built only when nvcc is found)",
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [((16, 300), -1), ((40, 7, 5), 1), ((300, 33), 0)]


@pytest.fixture
def routes(monkeypatch):
    """run(kw, route): `_rl.estimate(**kw)` by the route "host" (the CUDA code on the host), "cpu" (the CPU kernel)
    or "composed" (torch ops over the scan, as when a gradient is needed)."""
    calls = []

    def host_launch(device, *args):
        assert device.type == "cpu"
        calls.append(args[0])
        _native._cuda._rl_host(*args, 0)

    def run(kw, route):
        if route == "host":
            before = len(calls)
            with monkeypatch.context() as m, torch.no_grad():
                m.setattr(_rl, "_fusable", lambda *a: False)
                m.setattr(_rl, "_cuda_fusable", lambda *a: True)
                m.setattr(_native, "cuda_rl", host_launch)
                out = _rl.estimate(**kw)
            assert len(calls) == before + (kw["reward"].numel() > 0)  # an empty input launches nothing
            return out
        if route == "cpu":
            with torch.no_grad():
                return _rl.estimate(**kw)
        reward = kw["reward"].clone().requires_grad_()
        with torch.enable_grad():
            out = _rl.estimate(**{**kw, "reward": reward})
        return tuple(None if t is None else t.detach() for t in out)

    return run


def _compare(h, routes, kw, dtype):
    got = routes(kw, "host")
    for want in (routes(kw, "composed"), routes(kw, "cpu")):
        h.check(got, want, h.bound(kw, dtype, want))
    return got


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "dim"), LAYOUTS)
def test_cuda_code_matches_cpu_and_composed(mode, dtype, shape, dim, rl_helpers, routes):
    """Every combination of rates (number, per row, per element), flags and next values / bootstrap."""
    for rates in ("number", "per_row", "per_elem"):
        for flags in ("none", "done", "terminated", "both"):
            for nxt in ("shifted", "next_value", "bootstrap"):
                kw = rl_helpers.inputs(mode, shape, dim, dtype, rates, flags, nxt)
                _compare(rl_helpers, routes, kw, dtype)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize(("shape", "dim"), [((6, 50), -1), ((50, 6), 0), ((3, 50, 4), 1)])
@pytest.mark.parametrize("nxt", ["shifted", "next_value"])
def test_nan_after_a_terminal_step_does_not_leak(mode, shape, dim, nxt, rl_helpers, routes):
    """A terminal step at t0 of every sequence, a NaN value (and next value) right after it: nothing at or before
    t0 is NaN, and the NaN positions after it are the other routes' ones."""
    d = dim % len(shape)
    t0 = 20
    kw = rl_helpers.inputs(mode, shape, dim, torch.float32, "per_row", "done", nxt)
    kw["terminated"] = torch.zeros(shape, dtype=torch.bool)
    kw["terminated"].narrow(d, t0, 1).fill_(True)
    kw["value"].narrow(d, t0 + 1, 1).fill_(float("nan"))
    if kw["next_value"] is not None:
        kw["next_value"].narrow(d, t0, 1).fill_(float("nan"))
    got = _compare(rl_helpers, routes, kw, torch.float32)
    for out in got:
        assert out.narrow(d, 0, t0 + 1).isfinite().all()
    assert any(out.isnan().any() for out in got)  # the NaN does reach its own episode


@pytest.mark.parametrize(("shape", "dim"), [((6, 50), -1), ((50, 6), 0), ((3, 50, 4), 1)])
@pytest.mark.parametrize("rates", ["number", "per_elem"])
def test_vtrace_nan_log_prob_stays_nan(shape, dim, rates, rl_helpers, routes):
    """A NaN log-probability: a NaN ratio, kept NaN by the clipping (never the finite bar), where the CPU
    kernel and the composed route have their NaNs."""
    d = dim % len(shape)
    kw = rl_helpers.inputs(2, shape, dim, torch.float32, rates, "both", "next_value")
    kw["log_pi"].narrow(d, 17, 1).fill_(float("nan"))
    got = _compare(rl_helpers, routes, kw, torch.float32)
    assert all(out.narrow(d, 17, 1).isnan().all() for out in got)


def test_td_lambda_without_values_and_single_outputs(rl_helpers, routes):
    kw = rl_helpers.inputs(1, (9, 130), -1, torch.float32, "number", "both", "next_value")
    kw["value"] = None
    got = _compare(rl_helpers, routes, kw, torch.float32)
    assert got[1] is None
    for mode in (0, 1, 2):
        kw = rl_helpers.inputs(mode, (130, 9), 0, torch.float32, "per_elem", "both", "bootstrap")
        one = routes({**kw, "second": False}, "host")
        both = routes(kw, "host")
        assert one[1] is None
        # exact: the same code on the same inputs; the second output does not feed the first
        assert torch.equal(one[0], both[0])


def test_empty_and_single_step(rl_helpers, routes):
    for shape in [(0, 5), (4, 0), (3, 1), (1, 1)]:
        kw = rl_helpers.inputs(0, shape, -1, torch.float32, "number", "done", "bootstrap")
        got, want = routes(kw, "host"), routes(kw, "cpu")
        for a, b in zip(got, want):
            assert a.shape == shape
            if a.numel():
                # one step: adv = r + gamma * boot - v in float64 on both sides (contractions into fma may differ),
                # rounded to float32 once: within one float32 rounding of each other
                err = (a.double() - b.double()).abs().max().item()
                assert err <= 2 * 2.0**-24 * (b.double().abs().max().item() + 1)


def test_binding_rejects_bad_arguments():
    r = torch.zeros(2, 3)
    p = r.data_ptr()
    ok = [0, p, p, 0, 0, 0, p, 0, 0, 2, 3, 1, 0, 0.9, False, 0, 0.9, False, 0, 0, 0, 1.0, 1.0, 0]
    _native._cuda._rl_host(*ok)
    for i, bad, exc in [
        (1, 0, ValueError),  # no reward
        (0, 7, ValueError),  # unknown mode
        (8, 9, ValueError),  # unknown dtype
        (10, -1, ValueError),  # negative size
        (14, True, ValueError),  # per-element gamma without a buffer
    ]:
        args = list(ok)
        args[i] = bad
        with pytest.raises(exc):
            _native._cuda._rl_host(*args)
    with pytest.raises(ValueError, match="null pointer"):  # V-trace without log_pi / log_mu
        _native._cuda._rl_host(*[2, *ok[1:]])
