"""Differential property-based tests: the kernels against a slow, obvious float64 loop (hypothesis).

Random shapes, scan dims, directions, dtypes (fp16/bf16/fp32/fp64), layouts (transposed, expanded, sliced, flipped,
negated-bit and conjugate-imag views), discount forms (Python float, 0-d, per-row, broadcast per-element), resets,
initial values, NaN/inf at random places (also next to resets), 1-3 threads with the chunked long-row path forced
onto short rows, forward and gradient.

Error bound used for every comparison (forward and backward). Each output is a sum of terms
x_j * prod(gates) (plus the initial value); let S_t be the same sum with every quantity replaced by its absolute
value (computed by the same loop on |x|, |gates|, |initial|). A scan of length n in a compute type with unit
roundoff u_c (float32 for fp32/fp16/bf16, float64 for fp64) performs at most 2n + 12 roundings on any term (two
per sequential step; at most 2 log2(16) + 4 in the in-register SIMD scan plus the carry product; the chunk carry
adds <= 4 more), so |y_t - ref_t| <= (2n + 16) u_c S_t, and storing in the output dtype adds u_out |y_t|.
Gradients w.r.t. gamma and initial also sum over the broadcast elements (numel more roundings), so they use
(2n + numel + 32) u_c times the same absolute-value sum of their terms. tiny (the smallest normal number of the
output dtype) covers underflow.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from altgrad.discounted_cumsum import _native, discounted_cumsum

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
LAYOUTS = ["contiguous", "transposed", "expanded", "sliced", "flipped", "negated", "conj-imag"]


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# The slow, obvious reference.
# ---------------------------------------------------------------------------------------------------------------
def slow_scan(x, a, init, dim, reverse):
    """float64 loop over `dim`: y_t = x_t where a_t == 0 (a cut) or at the start without init, else x_t + a_t y_prev.

    `a` has the shape of `x` (resets already set to 0), `init` the shape of `x` without `dim` (or None).
    Differentiable; the inner where keeps a NaN/inf from crossing a cut in the gradient too."""
    xs, gs = x.movedim(dim, 0), a.movedim(dim, 0)
    n = xs.shape[0]
    out = [None] * n
    prev = init
    for t in range(n - 1, -1, -1) if reverse else range(n):
        if prev is None:
            y = xs[t]
        else:
            cut = gs[t] == 0
            y = torch.where(cut, xs[t], xs[t] + gs[t] * torch.where(cut, torch.zeros_like(prev), prev))
        out[t] = y
        prev = y
    return torch.stack(out, 0).movedim(0, dim)


# ---------------------------------------------------------------------------------------------------------------
# Strategies.
# ---------------------------------------------------------------------------------------------------------------
finite32 = st.floats(-4, 4, width=32)
gate32 = st.one_of(st.floats(0.0625, 1.0, width=32), st.floats(-1.0, -0.0625, width=32))


@st.composite
def values(draw, n, nonfinite):
    special = [NAN, INF, -INF] if nonfinite else []
    elem = st.one_of(finite32, st.sampled_from(special)) if special else finite32
    if special:
        # mostly finite, a few bad values
        elem = st.one_of(finite32, finite32, finite32, finite32, finite32, finite32, st.sampled_from(special))
    return draw(st.lists(elem, min_size=n, max_size=n))


def broadcast_shape(draw, shape):
    return tuple(s if draw(st.booleans()) else 1 for s in shape)


def layout(draw, vals: torch.Tensor, dtype, allowed):
    """A tensor of `dtype` equal to vals.to(dtype) but with the memory layout named by a drawn kind."""
    kind = draw(st.sampled_from(allowed))
    shape = vals.shape
    if kind == "transposed" and vals.dim() >= 2:
        return vals.to(dtype).transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "expanded" and vals.dim() >= 1 and vals.numel() > 0:
        d = draw(st.integers(0, vals.dim() - 1))
        return vals.narrow(d, 0, 1).to(dtype).expand(shape)
    if kind == "sliced" and vals.dim() >= 1:
        d = draw(st.integers(0, vals.dim() - 1))
        big = torch.zeros((*shape[:d], 2 * shape[d], *shape[d + 1 :]), dtype=dtype)
        big.narrow(d, 0, 2 * shape[d])[(slice(None),) * d + (slice(None, None, 2),)] = vals.to(dtype)
        return big[(slice(None),) * d + (slice(None, None, 2),)]
    if kind == "flipped" and vals.dim() >= 1:
        return vals.to(dtype).flip(-1).contiguous().flip(-1)
    if kind == "negated":
        return (-vals).to(dtype)._neg_view()
    if kind == "conj-imag" and dtype in (torch.float32, torch.float64):
        cplx = torch.complex64 if dtype == torch.float32 else torch.complex128
        z = torch.complex(torch.zeros(shape, dtype=dtype), (-vals).to(dtype)).to(cplx)
        return z.conj().imag  # a neg-bit view with stride 2
    return vals.to(dtype)


@st.composite
def problems(draw, nonfinite: bool, grad: bool):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0 if not grad else 1, 7), min_size=ndim, max_size=ndim)))
    assume(torch.Size(shape).numel() <= 400)
    dim = draw(st.integers(-ndim, ndim - 1))
    d = dim % ndim
    row_shape = shape[:d] + shape[d + 1 :]
    n = shape[d]
    numel = torch.Size(shape).numel()
    dtype = draw(st.sampled_from(DTYPES[2:] if grad else DTYPES))
    cd = compute_dtype(dtype)
    layouts = ["contiguous", "transposed"] if grad else LAYOUTS

    x_vals = torch.tensor(draw(values(numel, nonfinite)), dtype=torch.float64).reshape(shape)
    x = layout(draw, x_vals, dtype, layouts)

    # gamma: the value passed, and the gates (x's shape, float64) the kernel must use
    kind = draw(st.sampled_from(["float", "0-d", "per-row", "per-element"]))
    if kind == "per-row" and ndim < 2:
        kind = "per-element"
    g_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    zero_ok = not grad and draw(st.booleans())
    gate = st.one_of(gate32, st.just(0.0)) if zero_ok else gate32
    if kind == "float":
        gamma = draw(gate)
        gates = torch.full(shape, gamma, dtype=torch.float64)
    elif kind == "0-d":
        gamma = torch.tensor(draw(gate), dtype=g_dtype)
        gates = gamma.double().expand(shape)
    elif kind == "per-row":
        gv = torch.tensor(
            draw(
                st.lists(
                    gate,
                    min_size=len(torch.zeros(row_shape).reshape(-1)),
                    max_size=len(torch.zeros(row_shape).reshape(-1)),
                )
            ),
            dtype=torch.float64,
        )
        gamma = layout(draw, gv.reshape(row_shape), g_dtype, layouts[:2] + (["negated"] if not grad else []))
        gates = gamma.double().unsqueeze(d).expand(shape)
    else:
        gshape = broadcast_shape(draw, shape)
        gv = torch.tensor(
            draw(st.lists(gate, min_size=torch.Size(gshape).numel(), max_size=torch.Size(gshape).numel())),
            dtype=torch.float64,
        )
        gamma = layout(draw, gv.reshape(gshape), g_dtype, layouts[:2] + (["negated"] if not grad else []))
        gates = gamma.double().expand(shape)
        if (
            gshape[d] != 1
        ):  # per-element gates are stored in the compute dtype (values drawn exact in float32)
            gates = gates.to(cd).double()

    dones = None
    if draw(st.booleans()):
        dshape = broadcast_shape(draw, shape)
        dv = torch.tensor(
            draw(
                st.lists(
                    st.booleans(), min_size=torch.Size(dshape).numel(), max_size=torch.Size(dshape).numel()
                )
            ),
            dtype=torch.bool,
        ).reshape(dshape)
        dones = dv if draw(st.booleans()) else dv.to(draw(st.sampled_from([torch.float32, torch.int64])))
        gates = torch.where(dv.expand(shape), torch.zeros((), dtype=torch.float64), gates)

    initial, init_vals = None, None
    ikind = draw(st.sampled_from(["none", "float", "tensor"]))
    if ikind == "float":
        initial = draw(st.one_of(finite32, st.sampled_from([NAN, INF])) if nonfinite else finite32)
        init_vals = torch.full(row_shape, initial, dtype=torch.float64)
    elif ikind == "tensor":
        ishape = broadcast_shape(draw, row_shape)
        iv = torch.tensor(draw(values(torch.Size(ishape).numel(), nonfinite)), dtype=torch.float64).reshape(
            ishape
        )
        initial = layout(
            draw, iv, draw(st.sampled_from([torch.float32, torch.float64])), [*layouts[:2], "negated"]
        )
        init_vals = initial.double().expand(row_shape)

    reverse = draw(st.booleans())
    nthreads = draw(st.sampled_from([1, 2, 3]))
    return {
        "x": x,
        "gamma": gamma,
        "dim": dim,
        "reverse": reverse,
        "dones": dones,
        "initial": initial,
        "gates": gates,
        "init_vals": init_vals,
        "nthreads": nthreads,
        "dtype": dtype,
        "n": n,
        "d": d,
    }


class Threads:
    """torch threads set to k and the chunked path forced onto rows of >= 2 steps; both restored afterwards."""

    def __init__(self, k):
        self.k = k

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.k)
        self.tuning = _native._set_chunk_tuning(2, 1)

    def __exit__(self, *exc):
        _native._set_chunk_tuning(*self.tuning)
        torch.set_num_threads(self.old)


def check(got: torch.Tensor, ref: torch.Tensor, abs_sum: torch.Tensor, factor: float, u_c: float, dtype):
    """NaN/inf exactly where the reference has them; elsewhere within factor * u_c * abs_sum + u_out |ref| + tiny."""
    g = got.double()
    assert torch.equal(g.isnan(), ref.isnan()), f"NaN positions differ:\n{g}\n{ref}"  # exact: bool masks
    inf = ref.isinf()
    assert torch.equal(g[inf], ref[inf]), "infinities differ"  # exact: ±inf entries carry no rounding
    fin = ref.isfinite()
    bound = factor * u_c * abs_sum[fin] + U[dtype] * ref[fin].abs() + torch.finfo(dtype).tiny
    err = (g[fin] - ref[fin]).abs()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"


# ---------------------------------------------------------------------------------------------------------------
# The properties.
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(problems(nonfinite=True, grad=False))
def test_forward_matches_the_slow_loop(p):
    with Threads(p["nthreads"]):
        y = discounted_cumsum(
            p["x"], p["gamma"], dim=p["dim"], reverse=p["reverse"], dones=p["dones"], initial=p["initial"]
        )
    assert y.shape == p["x"].shape
    assert y.dtype == p["dtype"]
    if y.numel() == 0:
        return
    xv, d = p["x"].double(), p["d"]
    ref = slow_scan(xv, p["gates"], p["init_vals"], d, p["reverse"])
    iabs = None if p["init_vals"] is None else p["init_vals"].abs()
    abs_sum = slow_scan(xv.abs(), p["gates"].abs(), iabs, d, p["reverse"])
    check(y, ref, abs_sum, 2 * p["n"] + 16, U[compute_dtype(p["dtype"])], p["dtype"])


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(problems(nonfinite=False, grad=True), st.data())
def test_gradients_match_the_slow_loop(p, data):
    x = p["x"].detach().clone().requires_grad_()
    gamma = p["gamma"]
    g_leaf = gamma.detach().clone().requires_grad_() if isinstance(gamma, torch.Tensor) else None
    init = p["initial"]
    i_leaf = init.detach().clone().requires_grad_() if isinstance(init, torch.Tensor) else None
    w = torch.tensor(
        data.draw(st.lists(finite32, min_size=x.numel(), max_size=x.numel())), dtype=torch.float64
    ).reshape(x.shape)
    with Threads(p["nthreads"]):
        y = discounted_cumsum(
            x,
            g_leaf if g_leaf is not None else gamma,
            dim=p["dim"],
            reverse=p["reverse"],
            dones=p["dones"],
            initial=i_leaf if i_leaf is not None else init,
        )
        leaves = [t for t in (x, g_leaf, i_leaf) if t is not None]
        grads = torch.autograd.grad((y.double() * w).sum(), leaves, allow_unused=True)

    # the same loss through the float64 loop, once with the values and once with their absolute values
    d, n, dt = p["d"], p["n"], p["dtype"]

    def ref_grads(absolute: bool):
        f = (lambda t: t.abs()) if absolute else (lambda t: t)
        xr = f(x.detach().double()).requires_grad_()
        gr = f(g_leaf.detach().double()).requires_grad_() if g_leaf is not None else None
        ir = f(i_leaf.detach().double()).requires_grad_() if i_leaf is not None else None
        gates = f(p["gates"]) if gr is None else None
        if gr is not None:
            gg = gr.unsqueeze(d) if (p["x"].dim() > 1 and gr.dim() == p["x"].dim() - 1) else gr
            gates = gg.expand(x.shape)
            if p["dones"] is not None:
                gates = torch.where(
                    p["dones"].expand(x.shape) != 0, torch.zeros((), dtype=torch.float64), gates
                )
        init_vals = None
        if ir is not None:
            init_vals = ir.expand(p["init_vals"].shape)
        elif p["init_vals"] is not None:
            init_vals = f(p["init_vals"])
        yr = slow_scan(xr, gates, init_vals, d, p["reverse"])
        ls = [t for t in (xr, gr, ir) if t is not None]
        return torch.autograd.grad((yr * f(w)).sum(), ls, allow_unused=True)

    want, abs_sum = ref_grads(False), ref_grads(True)
    u_c = U[compute_dtype(dt)]
    for k, (got, ref, s) in enumerate(zip(grads, want, abs_sum)):
        if ref is None:
            assert got is None or not got.any()
            continue
        assert got is not None
        factor = 2 * n + 16 if k == 0 else 2 * n + x.numel() + 32
        check(got, ref, s, factor, u_c, got.dtype if got.dtype in U else dt)
