"""Fused RL estimators (GAE, TD(lambda), V-trace) against a float64 per-step loop, on both routes.

The fused C++ kernel runs when no gradient is needed; the composed route (torch ops over the differentiable scan)
runs when one is. Both are compared with ``loop``, written from the formulas with terminated and truncated steps kept
apart. Tolerances: conftest's TOL[dtype] * (max|ref| + 1) (float64 1e-10, float32 2e-5, bfloat16 3e-2: the output
rounding plus a float32-or-better carry over at most a few hundred discounted steps).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altgrad.discounted_cumsum import _rl, generalized_advantage_estimate

NAN = float("nan")


def loop(mode, r, v, nv, g, lam, done, term, lp=None, lm=None, rho_bar=1.0, c_bar=1.0):
    """Time on the last dim; float64; gamma and lam are numbers or tensors of r's shape. Every mask selects: an
    episode end or a zero gate takes x alone, so nothing crosses it (0 * inf would be NaN)."""
    r, v, nv = r.double(), v.double(), nv.double()
    n = r.shape[-1]
    g = torch.as_tensor(g, dtype=torch.float64).expand(r.shape)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(r.shape)
    out1, out2 = torch.zeros_like(r), torch.zeros_like(r)
    y = torch.zeros(r.shape[:-1], dtype=torch.float64)
    for t in reversed(range(n)):
        end = done[..., t] | term[..., t] | (t == n - 1)
        gt, lt = g[..., t], lam[..., t]
        boot = torch.where(term[..., t], 0.0, gt * nv[..., t])
        if mode == _rl.GAE:
            x = r[..., t] + boot - v[..., t]
            y = torch.where(end | (gt * lt == 0), x, x + gt * lt * y)
            out1[..., t], out2[..., t] = y, y + v[..., t]
        elif mode == _rl.TD_LAMBDA:
            # TorchRL's loop: at an episode end the bootstrapped gain is the next value itself
            y = torch.where(
                end,
                r[..., t] + boot,
                torch.where(
                    gt * lt == 0, r[..., t] + (1 - lt) * boot, r[..., t] + (1 - lt) * boot + gt * lt * y
                ),
            )
            out1[..., t], out2[..., t] = y, y - v[..., t]
        else:
            rho = (lp[..., t].double() - lm[..., t].double()).exp()
            pc, cc = rho.clamp_max(rho_bar), rho.clamp_max(c_bar)
            vs_after = y + (v[..., t + 1] if t + 1 < n else 0.0)
            vs_next = torch.where(end, nv[..., t], vs_after)
            adv = pc * (r[..., t] + torch.where(term[..., t], 0.0, gt * vs_next) - v[..., t])
            x = pc * (r[..., t] + boot - v[..., t])
            y = torch.where(end | (gt * cc == 0), x, x + gt * cc * y)  # a zero gate cuts, as an end
            out1[..., t], out2[..., t] = y + v[..., t], adv
    return out1, out2


def _inputs(shape, dtype, p_done=0.1):
    r, v, nv, lp = (torch.randn(shape, dtype=torch.float64) for _ in range(4))
    lm = lp + 0.5 * torch.randn(shape, dtype=torch.float64)  # rho spread around 1: both clips matter
    done = torch.rand(shape) < p_done
    term = done & (torch.rand(shape) < 0.5)  # terminated is a subset of done: the rest is truncated
    return [t.to(dtype) for t in (r, v, nv, lp, lm)], done, term


MODES = [_rl.GAE, _rl.TD_LAMBDA, _rl.VTRACE]
ROUTES = ["fused", "composed"]


def _run(route, mode, r, v, nv, g, lam, done, term, dim, lp, lm, **kw):
    if route == "composed":  # a gradient makes the call take the composed route
        r = r.clone().requires_grad_()
    vt = {"log_pi": lp, "log_mu": lm, "rho_bar": 1.0, "c_bar": 0.9} if mode == _rl.VTRACE else {}
    a, b = _rl.estimate(mode, r, v, nv, g, lam, done, term, dim=dim, **vt, **kw)
    return a.detach(), None if b is None else b.detach()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((5, 37), -1), ((37, 5), 0), ((3, 300, 4), 1), ((2, 3, 600), -1), ((1,), 0), ((70, 3), 0)],
)
def test_matches_loop(route, mode, shape, dim, close):
    (r, v, nv, lp, lm), done, term = _inputs(shape, torch.float64)
    got = _run(route, mode, r, v, nv, 0.97, 0.9, done, term, dim, lp, lm)
    mv = [t.movedim(dim, -1) for t in (r, v, nv, done, term, lp, lm)]
    want = loop(mode, *mv[:3], 0.97, 0.9, mv[3], mv[4], mv[5], mv[6], 1.0, 0.9)
    for a, w in zip(got, want):
        close(a, w.movedim(-1, dim), torch.float64)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flags", ["none", "done", "terminated", "both"])
@pytest.mark.parametrize("lam", [0.9, 0.0])
@pytest.mark.parametrize("next_values", [True, False])
@pytest.mark.parametrize("second", [True, False])
@pytest.mark.parametrize("dim", [-1, 0])
def test_every_flag_and_output_combination(route, mode, flags, lam, next_values, second, dim, close):
    """The kernel has one straight loop per combination of flags, next values, second output and lam == 0
    (TD(0): no carried dependency), on rows (time last) and on columns (time first, several columns); each
    against the loop, float64."""
    (r, v, nv, lp, lm), done, term = _inputs((3, 301), torch.float64, p_done=0.05)
    boot = None if next_values else torch.randn(3, dtype=torch.float64)
    zero = torch.zeros_like(done)
    d = done if flags in ("done", "both") else None
    m = term if flags in ("terminated", "both") else None
    ref_nv = nv if next_values else torch.cat([v[:, 1:], boot[:, None]], 1)
    ref_done = d if d is not None else (m if m is not None else zero)
    want = loop(mode, r, v, ref_nv, 0.97, lam, ref_done, m if m is not None else zero, lp, lm, 1.0, 0.9)

    def lay(t):  # time on `dim`
        return None if t is None else t.movedim(-1, dim).contiguous()

    args = (
        lay(r),
        lay(v),
        lay(nv) if next_values else None,
        0.97,
        lam,
        lay(d),
        lay(m),
        dim,
        lay(lp),
        lay(lm),
    )
    got = _run(route, mode, *args, bootstrap=boot, second=second)
    close(got[0], want[0].movedim(-1, dim), torch.float64)
    if second:
        close(got[1], want[1].movedim(-1, dim), torch.float64)
    else:
        assert got[1] is None


@pytest.mark.parametrize("mode", [_rl.GAE, _rl.TD_LAMBDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("next_values", [True, False])
def test_no_carry_path_in_low_precision(mode, dtype, next_values, close):
    """lam = 0 (TD(0)) runs without a carry in float for 32- and 16-bit inputs (one more rounding than a double
    sum, well inside the conftest bound) and still selects: a NaN next value of a terminal step stays out."""
    (r, v, nv, _, _), done, term = _inputs((4, 513), dtype)
    nv[term] = NAN
    boot = None if next_values else torch.randn(4, dtype=torch.float64)
    got = _run(
        "fused",
        mode,
        r,
        v,
        nv if next_values else None,
        0.99,
        0.0,
        done,
        term,
        -1,
        None,
        None,
        bootstrap=boot,
    )
    ref_nv = nv if next_values else torch.cat([v[:, 1:].double(), boot[:, None]], 1)
    want = loop(mode, r, v, ref_nv, 0.99, 0.0, done, term)
    for a, w in zip(got, want):
        assert a.dtype == dtype
        assert a.isfinite().all()
        close(a, w, dtype)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(route, mode, dtype, close):
    (r, v, nv, lp, lm), done, term = _inputs((4, 513), dtype)
    got = _run(route, mode, r, v, nv, 0.99, 0.95, done, term, -1, lp, lm)
    want = loop(mode, r, v, nv, 0.99, 0.95, done, term, lp, lm, 1.0, 0.9)
    for a, w in zip(got, want):
        assert a.dtype == dtype
        close(a, w, dtype)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_tensor_gamma_and_lam(route, mode, dim, close):
    (r, v, nv, lp, lm), done, term = _inputs((6, 40), torch.float64)
    g_elem = 0.9 + 0.1 * torch.rand(6, 40, dtype=torch.float64)
    lam_row = 0.8 + 0.2 * torch.rand(40 if dim == 0 else 6, dtype=torch.float64)  # one per row
    got = _run(route, mode, r, v, nv, g_elem, lam_row, done, term, dim, lp, lm)
    lam_full = lam_row.unsqueeze(0).expand(6, 40) if dim == 0 else lam_row.unsqueeze(1).expand(6, 40)
    mv = [t.movedim(dim, -1) for t in (r, v, nv, g_elem, lam_full, done, term, lp, lm)]
    want = loop(mode, *mv[:3], mv[3], mv[4], mv[5], mv[6], mv[7], mv[8], 1.0, 0.9)
    for a, w in zip(got, want):
        close(a, w.movedim(-1, dim), torch.float64)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", MODES)
def test_shifted_values_and_bootstrap(route, mode, close):
    """Without next values: V'_t = V_{t+1}, and the bootstrap after the last step (rows of several blocks)."""
    (r, v, _, lp, lm), done, term = _inputs((3, 700), torch.float64)
    boot = torch.randn(3, dtype=torch.float64)
    got = _run(route, mode, r, v, None, 0.99, 0.95, done, term, -1, lp, lm, bootstrap=boot)
    nv = torch.cat([v[:, 1:], boot[:, None]], 1)
    want = loop(mode, r, v, nv, 0.99, 0.95, done, term, lp, lm, 1.0, 0.9)
    for a, w in zip(got, want):
        close(a, w, torch.float64)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", MODES)
def test_nan_from_another_episode_does_not_leak(route, mode):
    """A NaN next value at a terminated step and a NaN in the next episode stay out of this one."""
    r, v, nv = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    done = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    term = done.clone()
    nv[2] = NAN  # the state after a terminal step has no meaningful value
    r[5] = NAN  # the next episode's data
    a, b = _run(route, mode, r, v, nv, 0.99, 0.95, done, term, -1, torch.zeros(8), torch.zeros(8))
    assert a[:3].isfinite().all(), a
    assert b[:3].isfinite().all(), b


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("shape", "dim"), [((4, 300), -1), ((300, 4), 0), ((2, 40, 3), 1)])
@pytest.mark.parametrize("gamma", ["number", "per_elem"])
@pytest.mark.parametrize("bars", [(1.0, 1.0), (1.0, 0.9), (0.8, 1.2)])
def test_vtrace_nan_log_prob_stays_nan(route, shape, dim, gamma, bars, close):
    """A NaN log-probability gives a NaN ratio, which the clipping keeps NaN (as torch.clamp in TorchRL and the
    loop): NaN outputs at its step and, through the carry, before it in its episode; never the finite clipped bar.
    Every kernel path: rows, columns, per-element gamma (the blocked path), equal and distinct bars."""
    (r, v, nv, lp, lm), done, term = _inputs(shape, torch.float64, p_done=0.02)
    d = dim % len(shape)
    lp.narrow(d, 17, 1).fill_(NAN)  # step 17 of every sequence
    lm.narrow(d, 29, 1).fill_(NAN)  # and step 29, through the other log-probability
    g = 0.97 if gamma == "number" else 0.9 + 0.09 * torch.rand(shape, dtype=torch.float64)
    if route == "composed":
        r = r.clone().requires_grad_()
    got = _rl.estimate(
        _rl.VTRACE,
        r,
        v,
        nv,
        g,
        1.0,
        done,
        term,
        dim=dim,
        log_pi=lp,
        log_mu=lm,
        rho_bar=bars[0],
        c_bar=bars[1],
    )
    gm = g if gamma == "number" else g.movedim(dim, -1)
    mv = [t.movedim(dim, -1) for t in (r.detach(), v, nv, done, term, lp, lm)]
    want = loop(_rl.VTRACE, *mv[:3], gm, 1.0, mv[3], mv[4], mv[5], mv[6], *bars)
    for a, w in zip(got, want):
        assert w.narrow(-1, 17, 1).isnan().all()  # the loop's NaNs are where the checker will look for ours
        close(a.detach(), w.movedim(-1, dim), torch.float64)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_vtrace_zero_ratio_cuts_the_carry(route, dim):
    """log_pi = -inf at step 3: ratio 0, so its gate gamma * c is 0 and nothing from later steps reaches it, not even
    an inf reward at step 5 (0 * inf would be NaN, as TorchRL gives at steps 0-3): every route selects instead of
    multiplying, rows and columns."""
    n = 8
    r, v, nv = torch.ones(n, 2), torch.zeros(n, 2), torch.zeros(n, 2)
    lp, lm = torch.zeros(n, 2), torch.zeros(n, 2)
    lp[3] = -float("inf")
    r[5] = float("inf")
    if dim == -1:
        r, v, nv, lp, lm = (t.t().contiguous() for t in (r, v, nv, lp, lm))
    if route == "composed":
        r = r.clone().requires_grad_()
    no = torch.zeros_like(v, dtype=torch.bool)
    vs, adv = _rl.estimate(_rl.VTRACE, r, v, nv, 0.9, 1.0, no, no, dim=dim, log_pi=lp, log_mu=lm)
    vs, adv = (t.detach().movedim(dim, 0) for t in (vs, adv))
    # step 3: p = c = 0, so v_s = V = 0; steps 0-2 carry from v_s(3) = 0 with ratio 1: y_2 = 1, y_1 = 1 + 0.9,
    # y_0 = 1 + 0.9 + 0.81; steps 4 and 5 see the inf
    want = torch.tensor([2.71, 1.9, 1.0, 0.0]).unsqueeze(1).expand(4, 2)
    torch.testing.assert_close(vs[:4], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(adv[:3], want[:3], rtol=0, atol=1e-6)  # r + gamma v_s(t + 1) - V, V = 0
    assert vs[4:6].isinf().all()
    # the advantage at step 3 is 0 * (r + gamma * v_s(4) - V) with v_s(4) = inf: NaN, a product, not a gate
    assert adv[3].isnan().all()


_SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0]


# `close` is a pure function (conftest's checker), so reusing it across examples is safe
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(MODES),
    route=st.sampled_from(ROUTES),
    b=st.integers(1, 4),
    n=st.integers(1, 40),
    dim=st.sampled_from([-1, 0]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    per_elem_gamma=st.booleans(),
    bars=st.sampled_from([(1.0, 1.0), (1.0, 0.9), (0.8, 1.2)]),
    seed=st.integers(0, 2**31 - 1),
    n_special=st.integers(0, 6),
)
def test_hostile_values_match_the_loop(
    mode, route, b, n, dim, dtype, per_elem_gamma, bars, seed, n_special, close
):
    """NaN, +-inf and zeros at random places of every input (rewards, values, next values, log-probabilities),
    random done / terminated flags, rows (time last) and columns (time first), number or per-element gamma: both
    routes have the loop's NaNs and infs where the loop has them and its finite values elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    shape = (b, n)
    r, v, nv, lp, lm = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(5))
    ins = [r, v, nv, lp, lm]
    for _ in range(n_special):
        which = int(torch.randint(0, 5, (), generator=gen))
        pos = (int(torch.randint(0, b, (), generator=gen)), int(torch.randint(0, n, (), generator=gen)))
        ins[which][pos] = _SPECIAL[int(torch.randint(0, len(_SPECIAL), (), generator=gen))]
    done = torch.rand(shape, generator=gen) < 0.15
    term = done & (torch.rand(shape, generator=gen) < 0.5)
    g = 0.9 + 0.09 * torch.rand(shape, generator=gen, dtype=torch.float64) if per_elem_gamma else 0.95
    ins = [t.to(dtype) for t in ins]
    want = loop(mode, *ins[:3], g, 0.9, done, term, ins[3], ins[4], *bars)
    mv = [t.t().contiguous() if dim == 0 else t for t in (*ins, done, term)]
    gm = g.t().contiguous() if dim == 0 and per_elem_gamma else g
    vt = (
        {"log_pi": mv[3], "log_mu": mv[4], "rho_bar": bars[0], "c_bar": bars[1]} if mode == _rl.VTRACE else {}
    )
    rr = mv[0].clone().requires_grad_() if route == "composed" else mv[0]  # a gradient: the composed route
    got = _rl.estimate(mode, rr, *mv[1:3], gm, 0.9, mv[5], mv[6], dim=dim, **vt)
    for a, w in zip(got, want):
        close((a.t() if dim == 0 else a).detach(), w, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [-1, 0])
def test_vtrace_ratio_is_exp_over_the_whole_range(dtype, dim):
    """The kernels form rho = e^(log_pi - log_mu) themselves (no temporary). With no clipping (bars = inf), a reward
    of 1, zero values and every step an episode end, v_s = rho: it equals torch.exp of the difference within 4 units
    of the dtype's rounding (the difference itself is exact in the kernel's precision: double for float64, float
    for float32, as torch computes it), across the range, through the subnormals to 0 and to inf, and NaN stays
    NaN."""
    lim = 760.0 if dtype == torch.float64 else 110.0
    diff = torch.linspace(-lim, lim, 40001, dtype=torch.float64).to(dtype)
    diff = torch.cat([diff, torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)])
    lp, lm = diff.clone(), torch.zeros_like(diff)
    lp[1::2], lm[1::2] = 0.5 * diff[1::2], -0.5 * diff[1::2]  # both log-probabilities move (halves are exact)
    # one step per sequence, so every step ends its episode: rows (N, 1) along dim -1, or columns (1, N) along dim 0
    shape = (-1, 1) if dim == -1 else (1, -1)
    lp, lm = lp.reshape(shape), lm.reshape(shape)
    r, v = torch.ones_like(lp), torch.zeros_like(lp)
    inf = float("inf")
    vs, _ = _rl.estimate(
        _rl.VTRACE, r, v, None, 0.9, 1.0, None, None, dim=dim, log_pi=lp, log_mu=lm, rho_bar=inf, c_bar=inf
    )
    want = torch.exp(lp - lm)
    assert torch.equal(vs.isnan(), want.isnan())  # exact: bool masks
    assert torch.equal(vs[want.isinf()], want[want.isinf()])  # exact: overflow to inf
    fin = want.isfinite()
    tiny = torch.finfo(dtype).tiny
    rel = ((vs[fin] - want[fin]).abs() / want[fin].clamp_min(tiny)).max().item()
    assert rel <= 4 * torch.finfo(dtype).eps, rel
    assert (vs[want == 0] == 0).all()


def test_truncation_bootstraps_from_its_next_value():
    """Golden numbers: gamma = 0.5, lam = 1; step 1 is truncated (done, not terminated), step 3 terminated."""
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    v = torch.zeros(1, 4)
    nv = torch.tensor([[0.0, 10.0, 0.0, 10.0]])
    done = torch.tensor([[False, True, False, True]])
    term = torch.tensor([[False, False, False, True]])
    adv = generalized_advantage_estimate(r, v, 0.5, 1.0, dones=done, terminated=term, next_values=nv)
    # step 1: 1 + 0.5 * 10 = 6; step 0: 1 + 0.5 * 6 = 4; step 3: 1 (no bootstrap); step 2: 1 + 0.5 = 1.5
    torch.testing.assert_close(adv, torch.tensor([[4.0, 6.0, 1.5, 1.0]]), rtol=0, atol=1e-6)
    # the old meaning of `dones` alone (terminal states): step 1 does not bootstrap
    old = generalized_advantage_estimate(r, v, 0.5, 1.0, dones=done, next_values=nv)
    torch.testing.assert_close(old, torch.tensor([[1.5, 1.0, 1.5, 1.0]]), rtol=0, atol=1e-6)


def test_gae_helper_argument_errors():
    r = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="`terminated` needs `next_values`"):
        generalized_advantage_estimate(r, r, 0.9, 0.9, dones=r > 0, terminated=r > 0)
    with pytest.raises(ValueError, match="`bootstrap` or `next_values`"):
        generalized_advantage_estimate(r, r, 0.9, 0.9, bootstrap=1.0, next_values=r)
    with pytest.raises(ValueError, match="`next_values`"):
        generalized_advantage_estimate(r, r, 0.9, 0.9, next_values=torch.zeros(5))
    with pytest.raises(ValueError, match="`terminated`"):
        generalized_advantage_estimate(r, r, 0.9, 0.9, terminated=torch.zeros(3) > 0, next_values=r)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(7, 3000), (3000, 70)])
def test_fused_result_does_not_depend_on_threads(mode, shape):
    (r, v, nv, lp, lm), done, term = _inputs(shape, torch.float32)
    dim = -1 if shape[0] < shape[1] else 0
    prev = torch.get_num_threads()
    try:
        outs = []
        for k in (1, 3):
            torch.set_num_threads(k)
            outs.append(_run("fused", mode, r, v, nv, 0.99, 0.95, done, term, dim, lp, lm))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*outs):
        assert torch.equal(a, b)  # exact: same kernel; each row's arithmetic does not depend on the split


@pytest.mark.parametrize("mode", [_rl.GAE, _rl.TD_LAMBDA])
def test_gradcheck(mode):
    """The estimators are linear in rewards, values and next values for fixed flags; float64 gradcheck."""
    (r, v, nv, _, _), done, term = _inputs((3, 9), torch.float64, p_done=0.3)
    r, v, nv = (t.requires_grad_() for t in (r, v, nv))

    def f(r, v, nv):
        return _rl.estimate(mode, r, v, nv, 0.9, 0.8, done, term, dim=-1)

    assert torch.autograd.gradcheck(f, (r, v, nv))
    boot = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.full((3, 9), 0.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r, v, b, g: _rl.estimate(mode, r, v, None, g, 0.8, done, term, bootstrap=b, dim=-1),
        (r, v, boot, g),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("view", ["transposed", "expanded", "flipped", "negated", "promoted"])
def test_views_give_the_values_of_their_contents(mode, view, close):
    """Inputs that are views (transposed, expanded, flipped, a lazily negated `-x`) or of another float dtype go
    through the kernel's buffer preparation; the result equals the call on plain contiguous copies (float64: the
    same arithmetic on the same numbers, so the tolerance only absorbs the conftest bound)."""
    (r, v, nv, lp, lm), done, term = _inputs((6, 40), torch.float64)

    def as_view(t):
        if view == "transposed":
            return t.t().contiguous().t()
        if view == "expanded":
            return t[:1].expand(6, 40)
        if view == "flipped":
            return t.flip(1).flip(1)
        if view == "negated":
            return torch._neg_view(-t)
        return t.float()

    views = [as_view(t) for t in (r, v, nv, lp, lm)]
    if view == "negated":
        assert views[0].is_neg()
    plain = [t.clone().contiguous() if view != "promoted" else t.float().double() for t in views]
    if view == "promoted":  # one float32 input among float64 ones: the result is float64
        views = [views[0], *plain[1:]]
    dflags = done[:1].expand(6, 40) if view == "expanded" else done
    tflags = dflags & term if view == "expanded" else term
    got = _run("fused", mode, *views[:3], 0.97, 0.9, dflags, tflags, -1, views[3], views[4])
    want = _run("fused", mode, *plain[:3], 0.97, 0.9, dflags.clone(), tflags.clone(), -1, plain[3], plain[4])
    for a, w in zip(got, want):
        assert a.dtype == torch.float64
        close(a, w, torch.float64)
