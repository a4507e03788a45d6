"""Rounding-error bounds for the zero-order tests (standard floating-point error analysis, Higham ch. 3).

Tolerances in this suite are computed from these bounds evaluated on the actual data, never copied from what one
machine printed. Notation: u = unit roundoff of the dtype (2^-24 for float32), γ_n = n·u / (1 − n·u). A sum of n
products computed in any order satisfies |fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_n Σ |a_i b_i|; each extra rounded
operation adds one u. Elementary functions (tanh) are taken to be accurate to 4 ulp (SLEEF's vectorised u35
variants are within 3.5 ulp, glibc within 1-2 ulp).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import altgrad.zero_order as zo
from altgrad.es_layers.functional import flipout_dense

F64 = torch.float64


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand (half of ``finfo.eps``)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = n u / (1 − n u)."""
    u = unit_roundoff(dtype)
    assert n * u < 1
    return n * u / (1 - n * u)


def mlp_loss_and_bound(
    params: list[Tensor],
    x: Tensor,
    y: Tensor,
    dtype: torch.dtype,
    w1_extra: Tensor | None = None,
    w2_extra: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact (float64) value and a bound on the rounding error of the float ``dtype`` evaluation of
    f = mean((W2 tanh(W1 x + b1) + b2 − y)²), for a stack of members (leading dim M of every param).

    ``w1_extra``/``w2_extra`` (optional, ≥ 0, shape of the W stacks) widen |W| by the magnitude σ|A||B|ᵀ/√r of a
    low-rank perturbation, computed either factored (x Wᵀ + (x B)(σA/√r)ᵀ) or materialised (W + σ A Bᵀ/√r rounded,
    then one GEMM); either way the error is within γ_{3k+1} (|x|(|W| + extra)ᵀ + |b|) for r ≤ 2k − 2.

    Returns:
        (values, bounds), both float64 of shape (M,).
    """
    w1, b1, w2, b2 = (p.to(F64) for p in params)
    x, y = x.to(F64), y.to(F64)
    u = unit_roundoff(dtype)
    k1, k2 = w1.shape[-1], w2.shape[-1]
    extra1 = 0 if w1_extra is None else 2 * k1
    extra2 = 0 if w2_extra is None else 2 * k2
    mag1 = w1.abs() if w1_extra is None else w1.abs() + w1_extra.to(F64)
    mag2 = w2.abs() if w2_extra is None else w2.abs() + w2_extra.to(F64)
    # layer 1: a = W1 x + b1; |δa| ≤ γ_{k1+1+extra} (|W1||x| + |b1|)
    a = x @ w1.transpose(-1, -2) + b1.unsqueeze(-2)
    da = gamma(k1 + 1 + extra1, dtype) * (x.abs() @ mag1.transpose(-1, -2) + b1.abs().unsqueeze(-2))
    # tanh: 1-Lipschitz, plus 4 ulp of its own
    h = torch.tanh(a)
    dh = da + 4 * u * h.abs()
    # layer 2: p = W2 h + b2 with the computed ĥ, |ĥ| ≤ |h| + δh
    p = h @ w2.transpose(-1, -2) + b2.unsqueeze(-2)
    dp = gamma(k2 + 1 + extra2, dtype) * ((h.abs() + dh) @ mag2.transpose(-1, -2) + b2.abs().unsqueeze(-2))
    dp = dp + dh @ mag2.transpose(-1, -2)
    # r = p − y (one rounding), s = r² (one rounding), mean of B values (γ_B + one division)
    r = p - y
    dr = dp + u * (r.abs() + dp)
    s = r * r
    ds = 2 * r.abs() * dr + dr * dr + u * (s + 2 * r.abs() * dr + dr * dr)
    batch = s.shape[-2] * s.shape[-1]
    values = s.mean((-2, -1))
    bounds = ds.mean((-2, -1)) + gamma(batch + 1, dtype) * (s + ds).mean((-2, -1))
    return values, bounds


def estimate_difference_bound(
    method: str,
    thetas: list[Tensor],
    z: list[Tensor],
    sigma: float,
    f_plus: Tensor,
    fb_plus: Tensor,
    f_minus: Tensor | None = None,
    fb_minus: Tensor | None = None,
    num_chunks: int = 1,
    top_k: int | None = None,
    dtype: torch.dtype = torch.float32,
    f0: float = 0.0,
    f0_bound: float = 0.0,
    z_mag: list[Tensor | None] | None = None,
    terms: int | None = None,
) -> list[Tensor]:
    """Elementwise bound on |ĝ_a − ĝ_b| for two float ``dtype`` computations of the same estimate ĝ = Σ_k w_k z_k.

    Both use the same directions z (exactly) and evaluate every member within ``fb`` of its exact value
    ``f`` (float64). The bound is
        Σ_k |δw_k| |z_k|                                         (weights from different function values)
      + 2 γ_{N+C+4} (Σ_k |w_k||z_k| + 2 Σ_k |w_k| (|θ| + σ|z_k|)/σ)   (each side's accumulation, incl. the in-place
                                                                     recovery Σ w z = (Σ w (θ+σz) − Σ w θ)/σ).
    For low-rank leaves pass the exact E_k as ``z``, |A_k||B_k|ᵀ/√r as ``z_mag`` and N·r as ``terms`` (the
    accumulation is one GEMM over N·r products). ``es`` and ``ars`` need the order of the values to be the same on both sides; this is asserted from the data
    (every gap between the sorted exact values exceeds the sum of the two bounds).
    """
    u = unit_roundoff(dtype)
    n = f_plus.numel()
    if method == "naive":
        w = f_plus / (sigma * n)
        dw = 2 * fb_plus / (sigma * n) + 4 * u * w.abs()
    elif method == "forward":
        w = (f_plus - f0) / (sigma * n)
        dw = 2 * (fb_plus + f0_bound) / (sigma * n) + 6 * u * w.abs()
    else:
        assert f_minus is not None
        assert fb_minus is not None
        d = f_plus - f_minus
        if method == "antithetic":
            w = d / (2 * sigma * n)
            dw = (fb_plus + fb_minus) / (sigma * n) + 6 * u * w.abs()
        elif method == "es":
            both, bb = torch.cat([f_plus, f_minus]), torch.cat([fb_plus, fb_minus])
            order = both.argsort()
            gaps = both[order].diff()
            assert (gaps > 2 * (bb[order][1:] + bb[order][:-1])).all(), "test data not rank-stable"
            w = (torch.arange(2 * n, dtype=F64) / (2 * n - 1) - 0.5)[order.argsort()]
            w = (w[:n] - w[n:]) / (2 * n)
            dw = 4 * u * w.abs()  # identical ranks; only the final scaling rounds
        else:  # ars
            b = n if top_k is None else min(top_k, n)
            m, mb = torch.minimum(f_plus, f_minus), torch.maximum(fb_plus, fb_minus)
            order = m.argsort()
            if b < n:
                assert m[order[b]] - m[order[b - 1]] > 2 * (mb[order[b]] + mb[order[b - 1]]), (
                    "top-b not stable"
                )
            keep = order[:b]
            kept = torch.cat([f_plus[keep], f_minus[keep]])
            s = kept.std(unbiased=False)
            fmax = torch.cat([fb_plus[keep], fb_minus[keep]]).max()
            # std of 2b values: 1-Lipschitz in the max norm of its inputs, plus γ_{2b+6} (s + max|x|) rounding
            ds = 2 * fmax + 2 * gamma(2 * b + 6, dtype) * (s + kept.abs().max())
            w = torch.zeros_like(f_plus)
            dw = torch.zeros_like(f_plus)
            w[keep] = d[keep] / (b * s)
            dd = 2 * (fb_plus[keep] + fb_minus[keep]) + 2 * u * d[keep].abs()
            dw[keep] = dd / (b * (s - ds)) + d[keep].abs() * ds / (b * s * (s - ds)) + 4 * u * w[keep].abs()
    g = gamma((terms or n) + num_chunks + 4, dtype)
    bounds = []
    for i, (theta, zk) in enumerate(zip(thetas, z)):
        z64 = zk.to(F64).reshape(n, -1)
        mag = z64.abs() if z_mag is None or z_mag[i] is None else z_mag[i].to(F64).reshape(n, -1)
        t = theta.to(F64).reshape(-1).abs()
        wa = w.abs().unsqueeze(1)
        acc = (wa * mag).sum(0) + 2 * (wa * (t + sigma * mag)).sum(0) / sigma
        bounds.append((dw.abs() @ z64.abs() + 2 * g * acc).reshape(theta.shape))
    return bounds


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor) -> None:
    """|actual − expected| ≤ bound elementwise (computed in float64), with a readable failure."""
    diff = (actual.to(F64) - expected.to(F64)).abs()
    ok = diff <= bound
    assert bool(ok.all()), f"max excess {(diff - bound).max().item():.3g}; max diff {diff.max().item():.3g}"


def sqrt_var_bound(var: float, r: int, k: float = 5.0) -> float:
    """k standard errors of a mean of r draws with variance var."""
    return k * math.sqrt(var / r)


def linear_loss_and_bound(
    w: Tensor, b: Tensor, x: Tensor, y: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Exact value and rounding bound of mean((x Wᵀ + b − y)²) in ``dtype`` for a stack of members (leading dim M)."""
    w, b, x, y = (t.to(F64) for t in (w, b, x, y))
    u = unit_roundoff(dtype)
    p = x @ w.transpose(-1, -2) + b.unsqueeze(-2)
    dp = gamma(w.shape[-1] + 1, dtype) * (x.abs() @ w.abs().transpose(-1, -2) + b.abs().unsqueeze(-2))
    r = p - y
    dr = dp + u * (r.abs() + dp)
    s = r * r
    ds = 2 * r.abs() * dr + dr * dr + u * (s + 2 * r.abs() * dr + dr * dr)
    batch = s.shape[-2] * s.shape[-1]
    return s.mean((-2, -1)), ds.mean((-2, -1)) + gamma(batch + 1, dtype) * (s + ds).mean((-2, -1))


def float64_sum_bound(w: Tensor, z: Tensor, terms: int, weight_rel: float = 0.0) -> Tensor:
    """Bound on |ĝ_a − ĝ_b| for two float64 computations of ĝ = Σ_k w_k z_k whose weights agree to ``weight_rel``
    relative (|δw_k| ≤ weight_rel·max|w|) and whose sums have at most ``terms`` rounded operations per element:
    2 γ_terms Σ|w_k||z_k| + weight_rel·max|w|·Σ|z_k|."""
    w64, z64 = w.to(F64).abs(), z.to(F64).abs().reshape(w.numel(), -1)
    out = 2 * gamma(terms, F64) * (w64 @ z64) + weight_rel * w64.max() * z64.sum(0)
    return out.reshape(z.shape[1:])


def lowrank_estimate_bound(params, x, y, n, sigma, rank, seed, num_chunks):
    """Bound of estimate_difference_bound for an antithetic MLP estimate with rank-r directions on 2-D leaves."""
    dist, leaves, f64 = zo.SeededNormal(seed), len(params), torch.float64
    z, z_mag, plus, minus, extra = [], [], [], [], []
    for i, p in enumerate(params):
        if p.ndim == 2:
            a = dist.draw((p.shape[0], rank), step=0, leaf=i, members=range(n)).to(f64)
            b = dist.draw((p.shape[1], rank), step=0, leaf=i + leaves, members=range(n)).to(f64)
            e = a @ b.transpose(1, 2) / rank**0.5
            mag = a.abs() @ b.abs().transpose(1, 2) / rank**0.5
            plus.append(p.to(f64) + sigma * e)
            minus.append(p.to(f64) - sigma * e)
            extra.append(torch.cat([sigma * mag, sigma * mag]))
        else:
            e = dist.draw(p.shape, step=0, leaf=i, members=range(n))
            mag = None
            plus.append(p + sigma * e)
            minus.append(p - sigma * e)
        z.append(e)
        z_mag.append(mag)
    fp, bp = mlp_loss_and_bound(plus, x, y, torch.float32, extra[0][:n], extra[1][:n])
    fm, bm = mlp_loss_and_bound(minus, x, y, torch.float32, extra[0][:n], extra[1][:n])
    return estimate_difference_bound(
        "antithetic", params, z, sigma, fp, bp, fm, bm, num_chunks, z_mag=z_mag, terms=n * rank
    )


def flipout_estimate_bound(params, x, y, n, sigma, seed, num_chunks):
    """Bound of estimate_difference_bound for an antithetic MLP estimate with Flipout directions on 2-D leaves."""
    dist, leaves, f64 = zo.SeededNormal(seed), len(params), torch.float64
    z, plus, minus, extra = [], [], [], []
    for i, p in enumerate(params):
        if p.ndim == 2:
            s = dist.draw(p.shape, step=0, leaf=i, members=range(1))[0]
            out_s = torch.where(
                dist.draw((p.shape[0],), step=0, leaf=i + leaves, members=range(n)) < 0, -1.0, 1.0
            )
            in_s = torch.where(
                dist.draw((p.shape[1],), step=0, leaf=i + 2 * leaves, members=range(n)) < 0, -1.0, 1.0
            )
            e = flipout_dense(s.to(f64), in_s.to(f64), out_s.to(f64))
            plus.append(p.to(f64) + sigma * e)
            minus.append(p.to(f64) - sigma * e)
            extra.append(sigma * s.abs().to(f64).expand(n, *p.shape))
        else:
            e = dist.draw(p.shape, step=0, leaf=i, members=range(n))
            plus.append(p + sigma * e)
            minus.append(p - sigma * e)
        z.append(e)
    fp, bp = mlp_loss_and_bound(plus, x, y, torch.float32, extra[0], extra[1])
    fm, bm = mlp_loss_and_bound(minus, x, y, torch.float32, extra[0], extra[1])
    return estimate_difference_bound("antithetic", params, z, sigma, fp, bp, fm, bm, num_chunks)
