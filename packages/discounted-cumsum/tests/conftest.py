"""Shared helpers for the discounted-cumsum tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

# Tolerances for comparing a result in `dtype` with a float64 reference, relative to max(|ref|) + 1.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Checks |actual - expected| <= TOL[dtype] * (max|expected| + 1), elementwise, with NaNs matching."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(a.isnan(), e.isnan())  # exact: bool masks
    finite = e.isfinite()
    # exact: ±inf entries carry no rounding
    assert torch.equal(a[~finite & ~e.isnan()], e[~finite & ~e.isnan()])
    scale = e[finite].abs().max().item() + 1.0 if finite.any() else 1.0
    err = (a[finite] - e[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def close():
    """The ``assert_close_rel`` checker (test modules cannot import conftest under --import-mode=importlib)."""
    return assert_close_rel


# ---------------------------------------------------------------------------------------------------------------
# Comparing routes of the fused RL estimators (test_cuda.py: the CUDA kernel on a GPU; test_cuda_rl_on_host.py: its
# per-sequence code run on the host) with the composed route (torch ops over the scan) and the CPU kernel.
#
# Error bound (rl_helpers.bound). Every route works on the same inputs (already rounded to `dtype`); they differ
# by their arithmetic:
# * the CUDA and CPU kernels carry float32/float64 data in float64 and 16-bit data in float32;
# * the composed route computes in the compute dtype (float32 for float32 and 16-bit data, float64 for float64),
#   with the scan accumulating in float64.
# Let u be the compute dtype's unit roundoff, M the largest |input| (rewards, values, next values, bootstrap), Y the
# largest |output| and a the largest gate (gamma * lam, or gamma * c_bar for V-trace). One step's x takes at most
# three adds and two products of terms <= M, times a clipped ratio exp(log_pi - log_mu) whose rounded difference
# and exp are off by (|log_pi - log_mu| + 2) u <= 12 u here: x is off by <= 50 u M. Its gate (rounded rates times
# the ratio) is off by <= 14 u, which times |y_(t+1)| <= Y gives <= 14 u Y. The recurrence y_t = x_t + a_t y_(t+1)
# sums those errors with weights a^k, i.e. times at most L = 1 / (1 - a); the second outputs (y +- v, V-trace's
# advantage from v_s at t + 1) add two more steps' worth. Hence |route1 - route2| <= u (L + 2) (50 M + 20 Y)
# before the final rounding to `dtype`, which adds at most u_out (|y1| + |y2|) <= 2.1 u_out Y (u_out: 2^-24
# float32, 2^-53 float64, 2^-8 bfloat16, 2^-11 float16).
# Every route forms V-trace's ratios in its compute dtype (float32 for 16-bit data: the CPU kernel's ratio_exp, the
# CUDA kernel's exp, the composed route's torch.exp), so 16-bit V-trace is compared like the other estimators.
# ---------------------------------------------------------------------------------------------------------------

_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _rl_inputs(mode, shape, dim, dtype, rates, flags, nxt):
    """Keyword arguments of `_rl.estimate` on the CPU (float64 draws rounded to `dtype`)."""
    d = dim % len(shape)
    row = shape[:d] + shape[d + 1 :]

    def data():
        return torch.randn(shape, dtype=torch.float64).to(dtype)

    kw = {"mode": mode, "reward": data(), "value": data(), "next_value": None, "dim": dim}
    if nxt == "next_value":
        kw["next_value"] = data()
    elif nxt == "bootstrap":
        kw["bootstrap"] = torch.randn(row, dtype=torch.float64)
    rate_shape = {"number": None, "per_row": row, "per_elem": shape}[rates]
    if rate_shape is None:
        kw["gamma"], lam = 0.97, 0.95
    else:
        kw["gamma"] = 0.9 + 0.07 * torch.rand(rate_shape, dtype=torch.float64)
        lam = 0.8 + 0.15 * torch.rand(rate_shape, dtype=torch.float64)
    if mode == 2:
        kw["log_pi"] = (0.5 * torch.randn(shape, dtype=torch.float64)).to(dtype)
        kw["log_mu"] = (0.5 * torch.randn(shape, dtype=torch.float64)).to(dtype)
        kw["rho_bar"], kw["c_bar"] = 1.0, 0.9
    else:
        kw["lam"] = lam
    if flags in ("done", "both"):
        kw["done"] = torch.rand(shape) < 0.05
    if flags in ("terminated", "both"):
        kw["terminated"] = torch.rand(shape) < 0.05
    return kw


def _to(kw, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _finite_max(t):
    """max |t| over its finite entries (0 for None or no finite entry)."""
    if t is None:
        return 0.0
    t = t.double()[t.isfinite()]
    return t.abs().max().item() if t.numel() else 0.0


def _rl_bound(kw, dtype, outputs):
    """The bound above for these inputs and reference outputs."""
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    gate = kw["c_bar"] if kw["mode"] == 2 else kw["lam"]
    gate = gate.max().item() if isinstance(gate, torch.Tensor) else gate
    g = kw["gamma"].max().item() if isinstance(kw["gamma"], torch.Tensor) else kw["gamma"]
    big = 1.0 / (1.0 - g * gate)
    m = max(_finite_max(kw.get(k)) for k in ("reward", "value", "next_value", "bootstrap"))
    y = max(_finite_max(o) for o in outputs)
    return u * (big + 2) * (50 * m + 20 * y) + 2.1 * _UNIT[dtype] * y


def _check_rl(got, want, bound):
    """Same shape, dtype and NaN positions, finite values within `bound`."""
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert a.shape == b.shape
        assert a.dtype == b.dtype
        a, b = a.double().cpu(), b.double().cpu()
        assert torch.equal(a.isnan(), b.isnan())  # exact: bool masks
        fin = b.isfinite()
        assert torch.equal(a.isfinite(), fin)  # exact: bool masks
        if fin.any():
            err = (a[fin] - b[fin]).abs().max().item()
            assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


@pytest.fixture
def rl_helpers():
    """inputs(mode, shape, dim, dtype, rates, flags, nxt) -> `_rl.estimate` keywords on the CPU; to(kw, device);
    bound(kw, dtype, outputs); check(got, want, bound). See the error bound above."""
    return SimpleNamespace(inputs=_rl_inputs, to=_to, bound=_rl_bound, check=_check_rl)
