"""Differential, property-based test: AddSign / PowerSign against a slow, obvious float64 reference.

The reference is TensorFlow's ``ApplyAddSign`` / ``ApplyPowerSign`` arithmetic written out in numpy
float64, element by element (a complex parameter is its (real, imag) pairs)::

    g  <- -g if maximize;  g <- g + wd * p (coupled)  or  p <- p - lr * wd * p (decoupled)
    m  <- beta * m + (1 - beta) * g
    s  <- sign(g) * sign(m)
    p  <- p - lr * (alpha + d * s) * g          (AddSign)
    p  <- p - lr * base ** (d * s) * g           (PowerSign)

with ``d = decay(t - 1)`` at the t-th step. Every step starts the reference from the optimizer's own
state (converted exactly to float64), so rounding does not compound and each step is checked
against a per-element error bound (derived below). Random shapes, parameter layouts (transposed,
sliced), gradient layouts (transposed, expanded, conjugated / negated views, sparse COO with
duplicate indices), dtypes,
hyper-parameters, NaN / inf gradients and 1 or 2 intra-op threads.

Non-finite semantics (TF's arithmetic, where NaN propagates): an element whose gradient is NaN or
+-inf gets a non-finite parameter and never a finite step; elements with finite inputs are not
affected by non-finite neighbours.
"""

import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from altgrad.sign_optim import AddSign, LinearInternalDecay, PowerSign  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]


def _real_dtype(dtype):
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def _np64(t):
    """A tensor's values as a float64 numpy array (complex: trailing (real, imag) axis), exactly."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(torch.float64).numpy().copy()


def _linear_decay(T, step):
    """TF's get_linear_decay_fn, written out."""
    return max(0.0, (T - min(step, T)) / T)


def _reference_step(p, m, g, h, d, m_ours, e_sum=0.0):
    """One TF step in float64; returns (p_new, m_new, error bound on p_new, error bound on m_new).

    Error bound: with u the unit roundoff of the parameter dtype (half types compute in float32,
    whose roundoff is below u) and eta its subnormal spacing (absolute underflow error), each op
    of the optimizer rounds once:
      g' = g + wd p            : |e_g| <= 2u (|g| + wd |p|) + eta
      m  = lerp(m, g', 1-beta) : |e_m| <= u |m_new| + 4u (|m| + |g'|) + (1-beta) |e_g| + eta
      multiplier (d, d ln base rounded to the dtype, one add / exp, one rounding):
                   AddSign   |e_k| <= 2u (|alpha| + |d|)
                   PowerSign |e_k| <= k (u |d ln base| + 3u)
      p = p - lr wd p          : 2u |p|
      p = p + (-lr) g' k       : u |p_new| + 3u (|p| + lr |g' k|) + lr (|k| |e_g| + |g'| |e_k|) + eta
    plus 2 lr k_max |e_g| when sign(g') is within e_g of zero. A sparse gradient's duplicate slices
    are summed first: ``e_sum`` (2u x count x sum of |slices| per row) adds to e_g. These are first-order bounds; the
    factor 2 applied to them covers the second-order terms (products of two roundoffs).
    Where |m_new| <= e_m the sign of m is not determined by the arithmetic: the optimizer's own
    m (checked to be within e_m) decides it.
    """
    u, eta = h["u"], h["eta"]
    lr, beta, wd = h["lr"], h["beta"], h["wd"]
    with np.errstate(all="ignore"):
        if h["maximize"]:
            g = -g
        e_g = np.zeros_like(g) + eta + e_sum
        p0 = p
        if wd and h["decoupled"]:
            p = p - lr * wd * p
        elif wd:
            g = g + wd * p
            e_g = 2 * u * (np.abs(g) + wd * np.abs(p0)) + eta
        m_new = beta * m + (1 - beta) * g
        e_m = u * np.abs(m_new) + 4 * u * (np.abs(m) + np.abs(g)) + (1 - beta) * e_g + eta
        e_m = 2 * e_m
        sign_m = np.where(np.abs(m_new) <= e_m, np.sign(m_ours), np.sign(m_new))
        s = np.sign(g) * sign_m
        if h["rule"] == "add":
            k = h["alpha"] + d * s
            e_k = 2 * u * (abs(h["alpha"]) + abs(d)) + 0 * k
            k_max = abs(h["alpha"]) + abs(d)
        else:
            c = d * math.log(h["alpha"])
            k = h["alpha"] ** (d * s)
            e_k = np.abs(k) * (u * abs(c) + 3 * u)
            k_max = h["alpha"] ** abs(d)
        p_new = p - lr * k * g
        e_p = (
            u * np.abs(p_new)
            + 3 * u * (np.abs(p) + lr * np.abs(g * k))
            + (2 * u * np.abs(p0) if wd and h["decoupled"] else 0)
            + lr * (np.abs(k) * e_g + np.abs(g) * e_k)
            + 2 * lr * k_max * e_g
            + eta
        )
    return p_new, m_new, 2 * e_p, e_m, g


def _check_close(name, ours, ref, bound, extra=""):
    ref_finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(ours), ref_finite), (  # exact: bool masks
        f"{name}: non-finite pattern differs from the reference {extra}"
    )
    with np.errstate(invalid="ignore"):
        err = np.abs(ours - ref)[ref_finite]
    if err.size:
        worst = np.argmax(err - bound[ref_finite])
        assert np.all(err <= bound[ref_finite]), (
            f"{name}: |ours - ref| = {err[worst]:.3e} > bound {bound[ref_finite][worst]:.3e} {extra}"
        )


@st.composite
def problems(draw, dtype):
    rule = draw(st.sampled_from(["add", "power"]))
    big = draw(st.integers(0, 9)) == 0  # sometimes large enough for 2 threads to split the work
    rows = draw(st.integers(1, 300 if big else 9))
    cols = draw(st.integers(1, 300 if big else 9))
    shape = draw(st.sampled_from([(rows, cols), (rows,), ()]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    grad_layout = draw(st.sampled_from(["contiguous", "transposed", "expanded", "lazy"]))
    return {
        "dtype": dtype,
        "rule": rule,
        "shape": shape,
        "layout": layout if len(shape) == 2 else "contiguous",
        "grad_layout": grad_layout if len(shape) == 2 or grad_layout == "lazy" else "contiguous",
        "lr": draw(st.sampled_from([0.0, 1e-3, 0.05, 0.3, 1.0])),
        "beta": draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
        "alpha": (
            draw(st.sampled_from([1.0, 0.1, 2.0, -0.5]))
            if rule == "add"
            else draw(st.sampled_from([math.e, 2.0, 10.0, 0.5]))
        ),
        "decay": draw(st.sampled_from([None, 1, 3, 6])),
        "wd": draw(st.sampled_from([0.0, 0.0, 0.05, 0.5])),
        "decoupled": draw(st.booleans()),
        "maximize": draw(st.booleans()),
        "foreach": draw(st.booleans()),
        "threads": draw(st.sampled_from([1, 2])),
        "steps": draw(st.integers(1, 3)),
        "nonfinite": draw(st.sampled_from([0, 0, 1, 3])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        # Sparse COO gradients (TF's _apply_sparse): no weight decay there.
        "sparse": len(shape) >= 1 and draw(st.integers(0, 3)) == 0,
    }


def _make_param(h, gen):
    """A leaf parameter with the drawn layout: a transposed or sliced view keeps its strides."""
    dtype, shape = h["dtype"], h["shape"]
    if h["layout"] == "transposed":
        storage_shape = shape[::-1]
    elif h["layout"] == "sliced":
        storage_shape = (shape[0] * 2, shape[1] + 1)
    else:
        storage_shape = shape
    storage = 3.0 * torch.randn(storage_shape, generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        storage = torch.complex(storage, 3.0 * torch.randn(storage_shape, generator=gen, dtype=torch.float64))
    storage = storage.to(dtype)
    if h["layout"] == "transposed":
        value = storage.t()
    elif h["layout"] == "sliced":
        value = storage[::2, 1:]
    else:
        value = storage
    p = torch.nn.Parameter(value)
    assert p.stride() == value.stride()
    return p


def _make_grad(h, shape, gen, step):
    """A gradient with the drawn layout, magnitude and (at the first step) NaN / inf entries."""
    dtype = h["dtype"]
    mags = torch.tensor([1e-4, 1e-2, 1.0, 30.0], dtype=torch.float64)
    mag = mags[torch.randint(0, 4, (), generator=gen)]
    layout = h["grad_layout"] if len(shape) == 2 else "contiguous"
    storage_shape = {"expanded": shape[1:], "transposed": shape[::-1]}.get(layout, shape)
    g = torch.randn(storage_shape, generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        g = torch.complex(g, torch.randn(storage_shape, generator=gen, dtype=torch.float64))
    g = (mag * g).to(dtype)
    if h["nonfinite"] and g.numel() and step == 0:
        flat = torch.view_as_real(g).view(-1) if g.is_complex() else g.view(-1)
        idx = torch.randint(0, flat.numel(), (h["nonfinite"],), generator=gen)
        vals = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
        flat[idx] = vals[torch.arange(len(idx)) % 3].to(flat.dtype)
    if layout == "expanded":
        g = g.expand(shape)
    elif layout == "transposed":
        g = g.t()
    if h["grad_layout"] == "lazy":
        g = g.conj() if g.is_complex() else torch._neg_view(-g)
    return g


def _make_sparse_grad(h, shape, gen, step):
    """A sparse COO gradient over random rows (with duplicates), plus its float64 row sums.

    Returns (grad, dense float64 sum, per-element summation error bound, touched-row mask).
    """
    dtype = h["dtype"]
    nnz = int(torch.randint(0, 2 * shape[0] + 1, (), generator=gen))
    rows = torch.randint(0, shape[0], (nnz,), generator=gen)
    values = torch.randn((nnz, *shape[1:]), generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        values = torch.complex(values, torch.randn(values.shape, generator=gen, dtype=torch.float64))
    values = (torch.tensor([1e-2, 1.0, 30.0])[torch.randint(0, 3, (), generator=gen)] * values).to(dtype)
    if h["nonfinite"] and values.numel() and step == 0:
        flat = torch.view_as_real(values).view(-1) if values.is_complex() else values.view(-1)
        idx = torch.randint(0, flat.numel(), (h["nonfinite"],), generator=gen)
        flat[idx] = torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(len(idx)) % 3].to(flat.dtype)
    grad = torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=True)
    # Sum in float64 over the (real, imag) view: complex index_add multiplies by alpha = 1 + 0j, which
    # turns a NaN imaginary part into a NaN real part.
    real_values = torch.view_as_real(values).double() if dtype.is_complex else values.double()
    real_shape = real_values.shape[1:]
    dense = torch.zeros((shape[0], *real_shape), dtype=torch.float64).index_add_(0, rows, real_values)
    abs_sum = torch.zeros_like(dense).index_add_(0, rows, real_values.abs())
    count = torch.bincount(rows, minlength=shape[0]).double().reshape(-1, *([1] * (abs_sum.dim() - 1)))
    touched = count.reshape(-1) > 0
    u = torch.finfo(_real_dtype(dtype)).eps / 2
    with np.errstate(invalid="ignore"):
        e_sum = (2 * u * count * abs_sum).numpy()
    return grad, dense.numpy(), np.nan_to_num(e_sum, nan=0.0, posinf=0.0), touched.numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_matches_float64_reference(dtype, data):
    h = data.draw(problems(dtype))
    real = _real_dtype(h["dtype"])
    fi = torch.finfo(real)
    h = {**h, "u": fi.eps / 2, "eta": fi.smallest_normal * fi.eps}
    gen = torch.Generator().manual_seed(h["seed"])
    p = _make_param(h, gen)
    cls = AddSign if h["rule"] == "add" else PowerSign
    decay = None if h["decay"] is None else LinearInternalDecay(h["decay"])
    if h["sparse"]:
        h["wd"] = 0.0
    kwargs = {
        "lr": h["lr"],
        "beta": h["beta"],
        "alpha": h["alpha"],
        "sign_internal_decay": decay,
        "weight_decay": h["wd"],
        "decoupled_weight_decay": h["decoupled"],
        "maximize": h["maximize"],
    }
    opt = cls([p], foreach=h["foreach"], **kwargs)
    twin = torch.nn.Parameter(p.detach().clone())
    opt_twin = cls([twin], foreach=not h["foreach"], **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(h["threads"])
    try:
        for t in range(1, h["steps"] + 1):
            if h["sparse"]:
                g, g64, e_sum, touched = _make_sparse_grad(h, tuple(p.shape), gen, t - 1)
            else:
                g = _make_grad(h, p.shape, gen, t - 1)
                g64, e_sum = _np64(g), 0.0
            p_before = _np64(p)
            m_before = _np64(opt.state[p]["exp_avg"]) if opt.state[p] else np.zeros_like(p_before)
            p.grad = g
            twin.grad = g.clone() if not (g.is_conj() or g.is_neg()) else g
            opt.step()
            opt_twin.step()
            d = 1.0 if h["decay"] is None else _linear_decay(h["decay"], t - 1)
            m_ours = _np64(opt.state[p]["exp_avg"])
            p_ref, m_ref, e_p, e_m, g_eff = _reference_step(p_before, m_before, g64, h, d, m_ours, e_sum)
            extra = f"at step {t} with {h}"
            if h["sparse"]:
                # TF's scatter_sub writes only the touched rows: the others keep their exact values.
                untouched = ~touched
                # exact: untouched rows
                assert np.array_equal(_np64(p)[untouched], p_before[untouched], equal_nan=True), extra
                p_ref[untouched], e_p[untouched] = p_before[untouched], 0.0
            _check_close("m", m_ours, m_ref, e_m, extra)
            _check_close("param", _np64(p), p_ref, e_p, extra)
            # A non-finite gradient never becomes a finite step.
            assert not np.isfinite(_np64(p)[~np.isfinite(g_eff)]).any(), extra
            # foreach and the for-loop agree bit for bit on the same inputs.
            # (NaN payload and sign bits are not values: NaN only has to meet NaN.)
            for a, b in ((p, twin), (opt.state[p]["exp_avg"], opt_twin.state[twin]["exp_avg"])):
                # exact: bit-parity by construction (CPU foreach loops the same kernels)
                torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True, msg=extra)
    finally:
        torch.set_num_threads(threads)
