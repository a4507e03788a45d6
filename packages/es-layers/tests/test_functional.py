"""altgrad.es_layers.functional: every mode's forward, dense noise and update against explicit per-member loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import altgrad.es_layers.functional as EF

DT = torch.float64
# float64 throughout: the batched and the per-member computations sum the same O(in·|kernel|) products in different
# orders, so they differ by a few ulps of the largest partial sum (|x|,|W| ~ 1, sums of < 100 terms: < 1e-13).
TOL = {"rtol": 1e-10, "atol": 1e-10}
N, M, K = 5, 7, 6  # members, out features, in features


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _perm_rows(n, size, count, seed):
    g = _g(seed)
    return torch.stack([torch.randperm(size, generator=g)[:count] for _ in range(n)])


def _signs(shape, seed):
    return torch.randint(0, 2, shape, generator=_g(seed)).to(DT) * 2 - 1


# Each mode: (noise args, explicit dense E_k of shape (N, M, K), forward fn, dense fn, weighted-sum fn)
def _explicit_linear_cases():
    g = _g(0)
    cases = {}
    noise_w = torch.randn(N, M, K, generator=g, dtype=DT)
    cases["perturbed"] = (
        noise_w.clone(),
        lambda x, w, b, nb, **kw: EF.perturbed_linear(x, w, b, noise_w, nb, **kw),
        lambda **kw: EF.perturbed_dense(noise_w, **kw),
        lambda wt, **kw: EF.perturbed_weighted_sum(wt, noise_w, **kw),
    )
    cols = _perm_rows(N, K, 2, 1)
    values = torch.randn(N, M, 2, generator=g, dtype=DT)
    dense = torch.zeros(N, M, K, dtype=DT)
    for k in range(N):
        for j in range(2):
            dense[k, :, cols[k, j]] = values[k, :, j]
    cases["sparse"] = (
        dense,
        lambda x, w, b, nb, **kw: EF.sparse_linear(x, w, b, cols, values, nb, **kw),
        lambda **kw: EF.sparse_dense(cols, values, K, **kw),
        lambda wt, **kw: EF.sparse_weighted_sum(wt, cols, values, K, **kw),
    )
    for name, (m_sp, n_sp) in {
        "permuted-in": (M, 4),
        "permuted-in-full": (M, K),
        "permuted-out": (3, K),
        "permuted-both": (5, 3),
    }.items():
        shared = torch.randn(m_sp, n_sp, generator=g, dtype=DT)
        in_idx = _perm_rows(N, K, n_sp, 2) if "in" in name or "both" in name else None
        out_idx = _perm_rows(N, M, m_sp, 3) if "out" in name or "both" in name else None
        dense = torch.zeros(N, M, K, dtype=DT)
        for k in range(N):
            for i in range(m_sp):
                for j in range(n_sp):
                    r = i if out_idx is None else int(out_idx[k, i])
                    c = j if in_idx is None else int(in_idx[k, j])
                    dense[k, r, c] = shared[i, j]

        def fwd(x, w, b, nb, _s=shared, _i=in_idx, _o=out_idx, **kw):
            return EF.permuted_linear(x, w, b, _s, _i, _o, nb, **kw)

        cases[name] = (
            dense,
            fwd,
            lambda _s=shared, _i=in_idx, _o=out_idx, **kw: EF.permuted_dense(_s, _i, _o, (M, K), **kw),
            lambda wt, _s=shared, _i=in_idx, _o=out_idx, **kw: EF.permuted_weighted_sum(
                wt, _s, _i, _o, (M, K), **kw
            ),
        )
    shared = torch.randn(M, K, generator=g, dtype=DT)
    for name, (s_in, s_out) in {
        "flip-in": (_signs((N, K), 4), None),
        "flip-out": (None, _signs((N, M), 5)),
        "flip-both": (_signs((N, K), 4), _signs((N, M), 5)),
    }.items():
        dense = torch.stack(
            [
                (torch.ones(M, 1, dtype=DT) if s_out is None else s_out[k][:, None])
                * shared
                * (torch.ones(1, K, dtype=DT) if s_in is None else s_in[k][None, :])
                for k in range(N)
            ]
        )
        cases[name] = (
            dense,
            lambda x, w, b, nb, _i=s_in, _o=s_out, **kw: EF.flipout_linear(x, w, b, shared, _i, _o, nb, **kw),
            lambda _i=s_in, _o=s_out, **kw: EF.flipout_dense(shared, _i, _o, **kw),
            lambda wt, _i=s_in, _o=s_out, **kw: EF.flipout_weighted_sum(wt, shared, _i, _o, **kw),
        )
    for r in (1, 3):
        a = torch.randn(N, M, r, generator=g, dtype=DT)
        b_ = torch.randn(N, K, r, generator=g, dtype=DT)
        dense = torch.stack([sum(torch.outer(a[k, :, j], b_[k, :, j]) for j in range(r)) for k in range(N)])
        cases[f"lowrank{r}"] = (
            dense,
            lambda x, w, b, nb, _a=a, _b=b_, **kw: EF.lowrank_linear(x, w, b, _a, _b, nb, **kw),
            lambda _a=a, _b=b_, **kw: EF.lowrank_dense(_a, _b, (M, K), **kw),
            lambda wt, _a=a, _b=b_, **kw: EF.lowrank_weighted_sum(wt, _a, _b, (M, K), **kw),
        )
    return cases


LINEAR = _explicit_linear_cases()


def _loop_linear(x, weight, bias, dense, noise_b, sigma, antithetic):
    """Row i: member i % n, repeat i // n, sign -1 on the second half of an even number of repeats."""
    n = dense.shape[0]
    reps = x.shape[0] // n
    out = []
    for i in range(x.shape[0]):
        k, r = i % n, i // n
        c = -1.0 if antithetic and reps > 1 and r >= reps // 2 else 1.0
        w = weight + c * sigma * dense[k]
        b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=DT)
        if noise_b is not None:
            b = b + c * sigma * noise_b[k]
        out.append(F.linear(x[i], w, b))
    return torch.stack(out)


@pytest.mark.parametrize("mode", sorted(LINEAR))
@pytest.mark.parametrize(
    ("reps", "antithetic", "sigma", "middle", "with_bias", "with_noise_b"),
    [
        (1, False, 1.0, (), True, True),
        (2, True, 0.3, (), True, True),
        (4, True, 1.0, (3,), False, True),
        (3, False, -0.5, (2,), True, False),
        (2, True, 2.0, (), False, False),
    ],
)
def test_linear_forward_matches_member_loop(mode, reps, antithetic, sigma, middle, with_bias, with_noise_b):
    dense, fwd, _, _ = LINEAR[mode]
    g = _g(10)
    weight = torch.randn(M, K, generator=g, dtype=DT)
    bias = torch.randn(M, generator=g, dtype=DT) if with_bias else None
    noise_b = torch.randn(N, M, generator=g, dtype=DT) if with_noise_b else None
    x = torch.randn(reps * N, *middle, K, generator=g, dtype=DT)
    got = fwd(x, weight, bias, noise_b, sigma=sigma, antithetic=antithetic)
    xf = x.reshape(reps * N, -1, K)
    want = torch.stack(
        [_loop_linear(xf[:, t], weight, bias, dense, noise_b, sigma, antithetic) for t in range(xf.shape[1])],
        dim=1,
    ).reshape(*x.shape[:-1], M)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("mode", sorted(LINEAR))
def test_linear_dense_and_weighted_sum(mode):
    dense, _, dense_fn, wsum_fn = LINEAR[mode]
    torch.testing.assert_close(dense_fn(), dense, **TOL)
    torch.testing.assert_close(dense_fn(sigma=0.5), 0.5 * dense, **TOL)
    w = torch.randn(N, generator=_g(11), dtype=DT)
    torch.testing.assert_close(wsum_fn(w), torch.einsum("k,kij->ij", w, dense), **TOL)
    torch.testing.assert_close(wsum_fn(w, sigma=2.0), 2 * torch.einsum("k,kij->ij", w, dense), **TOL)


def test_permuted_weighted_sum_scatter_path(monkeypatch):
    # few members -> the direct scatter path (one member per sub-chunk); same values as the GEMM path
    dense, _, _, wsum_fn = LINEAR["permuted-in"]
    w = torch.randn(N, generator=_g(12), dtype=DT)
    gemm = wsum_fn(w)
    monkeypatch.setattr(EF.permuted, "_SCATTER_PENALTY", 0)
    monkeypatch.setattr(EF.permuted, "_SCATTER_ELEMENTS", 1)
    torch.testing.assert_close(wsum_fn(w), gemm, **TOL)
    torch.testing.assert_close(gemm, torch.einsum("k,kij->ij", w, dense), **TOL)


# ----------------------------------------------------------------------------- conv
CI, CO, KH, KW = 4, 6, 3, 2


def _conv_cases():
    g = _g(20)
    cases = {}
    for groups in (1, 2):
        noise_w = torch.randn(N, CO, CI // groups, KH, KW, generator=g, dtype=DT)
        cases[f"perturbed-g{groups}"] = (
            groups,
            noise_w.clone(),
            lambda x, w, b, nb, _e=noise_w, _g=groups, **kw: EF.perturbed_conv2d(
                x, w, b, _e, nb, groups=_g, **kw
            ),
        )
    for name, (m_sp, n_sp) in {"perm-in": (CO, 2), "perm-out": (3, CI), "perm-both": (4, 3)}.items():
        shared = torch.randn(m_sp, n_sp, KH, KW, generator=g, dtype=DT)
        in_idx = _perm_rows(N, CI, n_sp, 21) if n_sp < CI or "in" in name else None
        out_idx = _perm_rows(N, CO, m_sp, 22) if m_sp < CO or "out" in name else None
        dense = torch.zeros(N, CO, CI, KH, KW, dtype=DT)
        for k in range(N):
            for i in range(m_sp):
                for j in range(n_sp):
                    r = i if out_idx is None else int(out_idx[k, i])
                    c = j if in_idx is None else int(in_idx[k, j])
                    dense[k, r, c] = shared[i, j]
        # exact: a permutation copies values
        assert torch.equal(EF.permuted_dense(shared, in_idx, out_idx, (CO, CI, KH, KW)), dense)
        cases[name] = (
            1,
            dense,
            lambda x, w, b, nb, _s=shared, _i=in_idx, _o=out_idx, **kw: EF.permuted_conv2d(
                x, w, b, _s, _i, _o, nb, **kw
            ),
        )
    for groups in (1, 2):
        shared = torch.randn(CO, CI // groups, KH, KW, generator=g, dtype=DT)
        s_in, s_out = _signs((N, CI), 23), _signs((N, CO), 24)
        dense = torch.zeros(N, CO, CI // groups, KH, KW, dtype=DT)
        for k in range(N):
            for o in range(CO):
                grp = o // (CO // groups)
                for j in range(CI // groups):
                    dense[k, o, j] = s_out[k, o] * shared[o, j] * s_in[k, grp * (CI // groups) + j]
        # exact: products with ±1 signs are exact
        assert torch.equal(EF.flipout_dense(shared, s_in, s_out, groups=groups), dense)
        cases[f"flip-both-g{groups}"] = (
            groups,
            dense,
            lambda x, w, b, nb, _s=shared, _i=s_in, _o=s_out, _g=groups, **kw: EF.flipout_conv2d(
                x, w, b, _s, _i, _o, nb, groups=_g, **kw
            ),
        )
    for r in (1, 2):
        a = torch.randn(N, CO, r, generator=g, dtype=DT)
        b_ = torch.randn(N, CI * KH * KW, r, generator=g, dtype=DT)
        dense = torch.stack([(a[k] @ b_[k].t()).view(CO, CI, KH, KW) for k in range(N)])
        cases[f"lowrank{r}"] = (
            1,
            dense,
            lambda x, w, b, nb, _a=a, _b=b_, **kw: EF.lowrank_conv2d(x, w, b, _a, _b, nb, **kw),
        )
    return cases


CONV = _conv_cases()


@pytest.mark.parametrize("mode", sorted(CONV))
@pytest.mark.parametrize(
    ("reps", "antithetic", "sigma", "conv"),
    [
        (1, True, 1.0, {}),
        (2, True, 0.7, {"stride": 2, "padding": 1}),
        (3, False, 1.5, {"dilation": (2, 1), "padding": (2, 0)}),
    ],
)
def test_conv_forward_matches_member_loop(mode, reps, antithetic, sigma, conv):
    groups, dense, fwd = CONV[mode]
    g = _g(30)
    weight = torch.randn(CO, CI // groups, KH, KW, generator=g, dtype=DT)
    bias = torch.randn(CO, generator=g, dtype=DT)
    noise_b = torch.randn(N, CO, generator=g, dtype=DT)
    x = torch.randn(reps * N, CI, 7, 6, generator=g, dtype=DT)
    got = fwd(x, weight, bias, noise_b, sigma=sigma, antithetic=antithetic, **conv)
    rows = []
    for i in range(x.shape[0]):
        k, r = i % N, i // N
        c = -1.0 if antithetic and reps > 1 and r >= reps // 2 else 1.0
        w = weight + c * sigma * dense[k]
        b = bias + c * sigma * noise_b[k]
        rows.append(F.conv2d(x[i : i + 1], w, b, groups=groups, **conv))
    torch.testing.assert_close(got, torch.cat(rows), **TOL)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    weight = torch.zeros(M, K, dtype=DT)
    x = torch.zeros(2 * N, K, dtype=DT)
    with pytest.raises(ValueError, match=r"noise_w must have shape \(5, 7, 6\)"):
        EF.perturbed_linear(x, weight, None, torch.zeros(N, K, M, dtype=DT))
    with pytest.raises(ValueError, match="multiple of the number of members"):
        EF.perturbed_linear(torch.zeros(7, K, dtype=DT), weight, None, torch.zeros(N, M, K, dtype=DT))
    with pytest.raises(ValueError, match="even number of repeats"):
        EF.lowrank_linear(
            torch.zeros(3 * N, K, dtype=DT),
            weight,
            None,
            torch.zeros(N, M, 1, dtype=DT),
            torch.zeros(N, K, 1, dtype=DT),
            antithetic=True,
        )
    with pytest.raises(ValueError, match=r"b must have shape"):
        EF.lowrank_linear(x, weight, None, torch.zeros(N, M, 2, dtype=DT), torch.zeros(N, K, 1, dtype=DT))
    with pytest.raises(TypeError, match="cols must be an int64"):
        EF.sparse_linear(x, weight, None, torch.zeros(N, 1), torch.zeros(N, M, 1, dtype=DT))
    with pytest.raises(ValueError, match="x must have shape"):
        EF.flipout_linear(torch.zeros(N, K + 1, dtype=DT), weight, None, weight, torch.ones(N, K, dtype=DT))
    with pytest.raises(ValueError, match="in_sign must have shape"):
        EF.flipout_linear(x, weight, None, weight, torch.ones(N, K + 1, dtype=DT))
    with pytest.raises(ValueError, match="at least one of"):
        EF.permuted_linear(x, weight, None, weight)
    with pytest.raises(ValueError, match="shared must have shape"):
        EF.permuted_linear(x, weight, None, weight, _perm_rows(N, K, 3, 0))
    with pytest.raises(ValueError, match="sigma must be finite"):
        EF.perturbed_linear(x, weight, None, torch.zeros(N, M, K, dtype=DT), sigma=float("nan"))
    with pytest.raises(ValueError, match="4-D input"):
        EF.lowrank_conv2d(x, torch.zeros(CO, CI, 1, 1), None, torch.zeros(N, CO, 1), torch.zeros(N, CI, 1))


# ----------------------------------------------------------------------------- IID linear: the no-grad paths
@pytest.mark.parametrize(
    ("reps", "antithetic", "middle", "with_bias", "with_noise_b"),
    [
        (1, False, (), True, True),
        (2, True, (3,), True, False),
        (4, True, (), False, True),
        (3, False, (2,), True, True),
    ],
)
@pytest.mark.parametrize(
    ("strategy", "block_bytes"),
    [
        ("shared", 1 << 22),
        ("blocked", 1),
        ("blocked", 1 << 22),
        ("split", 1 << 22),
    ],  # 1 byte: a member per block
)
def test_perturbed_linear_no_grad_paths(
    monkeypatch, reps, antithetic, middle, with_bias, with_noise_b, strategy, block_bytes
):
    # Without autograd the forward multiplies a shared input (x expanded over the rows) by W once and by every
    # E_k, builds W + cσE_k block by block for members with enough rows, or adds x E_kᵀ to x Wᵀ; each must equal
    # the explicit member loop and the differentiable path.
    monkeypatch.setattr(EF.iid, "_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(EF.iid, "_BLOCKED_MIN_ROWS", 0 if strategy == "blocked" else 1 << 30)
    shared = strategy == "shared"
    ran = []
    for name in ("_shared_input_linear_", "_member_input_linear_"):
        original = getattr(EF.iid, name)
        monkeypatch.setattr(EF.iid, name, lambda *a, _f=original, _n=name: (ran.append(_n), _f(*a)))
    noise_w = LINEAR["perturbed"][0]
    g = _g(13)
    weight = torch.randn(M, K, generator=g, dtype=DT)
    bias = torch.randn(M, generator=g, dtype=DT) if with_bias else None
    noise_b = torch.randn(N, M, generator=g, dtype=DT) if with_noise_b else None
    if shared:
        x = torch.randn(*middle, K, generator=g, dtype=DT).expand(reps * N, *middle, K)
    else:
        x = torch.randn(reps * N, *middle, K, generator=g, dtype=DT)
    out = torch.full((reps * N, *middle, M), float("nan"), dtype=DT)
    got = EF.perturbed_linear(x, weight, bias, noise_w, noise_b, sigma=0.3, antithetic=antithetic, out=out)
    assert got is out
    expected = {"shared": ["_shared_input_linear_"], "blocked": ["_member_input_linear_"], "split": []}
    assert ran == expected[strategy]
    xf = x.reshape(reps * N, -1, K)
    want = torch.stack(
        [_loop_linear(xf[:, t], weight, bias, noise_w, noise_b, 0.3, antithetic) for t in range(xf.shape[1])],
        dim=1,
    ).reshape(*x.shape[:-1], M)
    torch.testing.assert_close(got, want, **TOL)
    differentiable = EF.perturbed_linear(
        x, weight.requires_grad_(), bias, noise_w, noise_b, sigma=0.3, antithetic=antithetic
    )
    assert differentiable.requires_grad
    torch.testing.assert_close(differentiable.detach(), want, **TOL)


def test_perturbed_linear_out_errors():
    noise_w = LINEAR["perturbed"][0]
    weight = torch.randn(M, K, dtype=DT)
    x = torch.randn(N, K, dtype=DT)
    for bad in (torch.empty(N, M + 1, dtype=DT), torch.empty(N, M), torch.empty(M, N, dtype=DT).T):
        with pytest.raises(ValueError, match="out must be a contiguous tensor of shape"):
            EF.perturbed_linear(x, weight, None, noise_w, out=bad)
    with pytest.raises(ValueError, match="out= is for evaluation without autograd"):
        EF.perturbed_linear(x, weight.requires_grad_(), None, noise_w, out=torch.empty(N, M, dtype=DT))


@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("rank", [1, 3])
def test_lowrank_linear_factor_layouts(layout, rank):
    # rank 1 reads b through a re-strided view (bmm's fast path): every storage layout of b must give the same math
    gen = torch.Generator().manual_seed(7)
    n, m, k, reps, t = 5, 4, 6, 2, 3
    x = torch.randn(reps * n, t, k, generator=gen)
    w, bias = torch.randn(m, k, generator=gen), torch.randn(m, generator=gen)
    a, eps = torch.randn(n, m, rank, generator=gen), torch.randn(n, m, generator=gen)
    b_full = torch.randn(n + 1, k, rank, generator=gen)
    b = {
        "contiguous": b_full[:n].clone(),
        "offset": b_full[1:],
        "strided": b_full[:n].transpose(1, 2).contiguous().transpose(1, 2),
    }[layout]
    y = EF.lowrank_linear(x, w, bias, a, b, eps, sigma=0.5, antithetic=True)
    ref = torch.empty(reps * n, t, m, dtype=torch.float64)
    for i in range(reps * n):
        kk, c = i % n, 0.5 if i < n else -0.5
        e = a[kk].double() @ b[kk].double().T
        ref[i] = x[i].double() @ (w.double() + c * e).T + bias.double() + c * eps[kk].double()
    # float32: dot products of <= 6 O(1) terms plus a rank-3 product; each entry within ~20 * 2**-24 * 10
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
