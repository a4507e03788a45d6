"""Unbiasedness and variance of the estimators against closed forms (fixed seeds, stated tolerances).

Linear f(θ) = a·θ + c at θ = 0, D = 8, float64. For one direction z with i.i.d. unit-variance elements,
E[(a·z)² z_i²] = ‖a‖² + (κ − 1) a_i² with κ = E[z⁴] (3 for Gaussian, 1 for Rademacher). Hence, per coordinate:

- antithetic and (correct) forward:  Var[ĝ_i] = (‖a‖² + (κ − 2) a_i²) / N
- naive:                             Var[ĝ_i] = (c²/σ² + ‖a‖² + (κ − 2) a_i²) / N

Each case runs R independent estimates. Means must be within 5 standard errors sqrt(Var/R) of a (per coordinate);
the summed sample variance must be within 25% of the closed form (its relative standard error is below
sqrt(2/R) ≈ 8% for R = 300, so 25% is a ≥ 3σ bound).
"""

import _bounds
import pytest
import torch

import altgrad.zero_order as zo
from altgrad.zero_order import estimate_gradient

D = 8
A = torch.linspace(-1, 1, D, dtype=torch.float64)
C = 3.0
R = 300


def _estimates(method, distribution, n, sigma, r=R, **kw):
    theta = torch.zeros(D, dtype=torch.float64)
    rows = [
        estimate_gradient(lambda t: A @ t + C, [theta], distribution, method, n, sigma, **kw)[0]
        for _ in range(r)
    ]
    return torch.stack(rows)


def _closed_form_var(method, kappa, n, sigma):
    var = (A.pow(2).sum() + (kappa - 2) * A.pow(2)) / n
    if method == "naive":
        var = var + C**2 / sigma**2 / n
    return var


def _check(est, var):
    mean = est.mean(0)
    se = (var / est.shape[0]).sqrt()
    assert ((mean - A).abs() <= 5 * se).all(), (mean, A, se)
    ratio = est.var(0).sum() / var.sum()
    assert 0.75 < ratio < 1.25, ratio.item()


DISTRIBUTIONS = {
    "torch-normal": (lambda: torch.distributions.Normal(0.0, 1.0), 3.0),
    "callable-randn": (lambda: lambda shape: torch.randn(shape), 3.0),
    "seeded-normal": (lambda: zo.SeededNormal(11), 3.0),
    "noise-table": (lambda: zo.NoiseTable(5, size=1 << 16), 3.0),
    "seeded-rademacher": (lambda: zo.SeededRademacher(13), 1.0),
}


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
def test_mean_and_variance_match_closed_form(method, dist):
    make, kappa = DISTRIBUTIONS[dist]
    n, sigma = 32, 0.5
    _check(_estimates(method, make(), n, sigma), _closed_form_var(method, kappa, n, sigma))


@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_sigma_scaling(sigma):
    # σ ≠ 1: naive's variance grows like c²/σ²; antithetic and forward do not depend on σ for linear f.
    for method in ("naive", "forward", "antithetic"):
        n = 64
        _check(_estimates(method, zo.SeededNormal(1), n, sigma), _closed_form_var(method, 3.0, n, sigma))


def test_forward_variance_shrinks_with_n():
    # TorchOpt <= 0.7.3's `forward` has O(1) variance in N (reference §1.6); the documented estimator has 1/N.
    small = _estimates("forward", zo.SeededNormal(2), 16, 1.0, r=200).var(0).sum()
    large = _estimates("forward", zo.SeededNormal(3), 256, 1.0, r=200).var(0).sum()
    assert 10 < (small / large).item() < 25  # closed form: 16


def test_quadratic_unbiased():
    # f(θ) = ½ θᵀHθ + bᵀθ: both naive and antithetic are unbiased for ∇f = Hθ + b (odd moments of z vanish).
    g = torch.Generator().manual_seed(0)
    m = torch.randn(D, D, generator=g, dtype=torch.float64)
    h = m @ m.T / D
    b = torch.randn(D, generator=g, dtype=torch.float64)
    theta0 = torch.randn(D, generator=g, dtype=torch.float64)
    grad = h @ theta0 + b

    def f(t):
        return 0.5 * t @ h @ t + b @ t

    for method, sigma in (("antithetic", 0.7), ("naive", 0.7), ("forward", 0.7)):
        dist = zo.SeededNormal(4)  # one distribution: each estimate takes the next step, so fresh noise
        est = torch.stack([estimate_gradient(f, [theta0], dist, method, 64, sigma)[0] for _ in range(150)])
        se = est.std(0) / 150**0.5
        assert ((est.mean(0) - grad).abs() <= 5 * se + 1e-12).all(), (est.mean(0), grad)


def test_es_is_centered_rank_direction():
    # OpenAI-ES: weights (r⁺ − r⁻)/(2N) from centered ranks over all 2N values; check against a manual computation.
    dist = zo.SeededNormal(21)
    theta = torch.zeros(D, dtype=torch.float64)
    n = 40
    (g,) = estimate_gradient(lambda t: (A @ t) ** 3, [theta], dist, "es", n, 0.3)
    z = zo.SeededNormal(21).draw((D,), step=0, leaf=0, members=range(n), dtype=torch.float64)
    fp, fm = ((0.3 * z) @ A) ** 3, ((-0.3 * z) @ A) ** 3
    ranks = torch.cat([fp, fm]).argsort().argsort().to(torch.float64) / (2 * n - 1) - 0.5
    w = (ranks[:n] - ranks[n:]) / (2 * n)
    want = w @ z
    # float64, identical ranks (the values are far apart): only the sums round, ≤ 2 γ_{N+8} Σ|w||z|.
    _bounds.assert_within(g, want, _bounds.float64_sum_bound(w, z, n + 8))
    # and it points along a
    many = estimate_gradient(lambda t: A @ t, [theta], zo.SeededNormal(1), "es", 2000, 0.3)[0]
    assert torch.nn.functional.cosine_similarity(many, A, dim=0) > 0.95


def test_ars_top_k_formula():
    dist = zo.SeededNormal(5)
    theta = torch.zeros(D, dtype=torch.float64)
    n, b, sigma = 30, 7, 0.2

    def f(t):
        return (A @ t - 1.0) ** 2

    (g,) = estimate_gradient(f, [theta], dist, "ars", n, sigma, top_k=b)
    z = zo.SeededNormal(5).draw((D,), step=0, leaf=0, members=range(n), dtype=torch.float64)
    fp = torch.stack([f(sigma * zk) for zk in z])
    fm = torch.stack([f(-sigma * zk) for zk in z])
    keep = torch.minimum(fp, fm).argsort()[:b]
    std = torch.cat([fp[keep], fm[keep]]).std(unbiased=False)
    w = (fp[keep] - fm[keep]) / (b * std)
    want = w @ z[keep]
    # float64: the values agree to γ_{D+2} relative, so the weights (differences over a std of 2b values) agree to
    # γ_{4b+D+16}·max|f|/(b·std) relative to max|w| at most; the sums round by ≤ 2 γ_{N+8} Σ|w||z|.
    fmax = torch.cat([fp, fm]).abs().max()
    rel = _bounds.gamma(4 * b + D + 16, torch.float64) * (fmax / (b * std) / w.abs().max() + 1)
    _bounds.assert_within(g, want, _bounds.float64_sum_bound(w, z[keep], n + 8, rel.item()))


@pytest.mark.parametrize("method", ["es", "ars"])
def test_two_pass_regeneration_matches_single_chunk(method):
    # Seeded noise is regenerated (not stored) in the second pass; chunking must not change the estimate.
    theta = torch.randn(D, dtype=torch.float64)
    f = lambda t: (A @ t).sin() + t.pow(2).sum()  # noqa: E731
    one = estimate_gradient(f, [theta], zo.SeededNormal(9), method, 50, 0.1)[0]
    many = estimate_gradient(f, [theta], zo.SeededNormal(9), method, 50, 0.1, chunk_size=6)[0]
    # float64, same values and weights (chunks evaluate the same members with the same ops); only the sums are
    # split differently: |Σ w z (one GEMV) − Σ_chunks| ≤ 2 γ_{N+C+4} max|w| Σ|z|, with |w_k| ≤ 1/(2N) for es
    # (ranks in [-½, ½]) and |w_k| = |f⁺−f⁻|/(b·std) ≤ 2√(2b)/b ≤ 1 for ars (b = N = 50).
    z = zo.SeededNormal(9).draw((D,), step=0, leaf=0, members=range(50), dtype=torch.float64)
    w_max = 1.0 if method == "ars" else 1 / 100
    bound = 2 * _bounds.gamma(50 + 9 + 4, torch.float64) * w_max * z.abs().sum(0)
    _bounds.assert_within(many, one, bound)
    # A non-regenerable distribution keeps the noise of the first pass instead.
    torch.manual_seed(1)
    kept = estimate_gradient(f, [theta], torch.distributions.Normal(0.0, 1.0), method, 50, 0.1, chunk_size=6)[
        0
    ]
    torch.manual_seed(1)
    ref = estimate_gradient(f, [theta], torch.distributions.Normal(0.0, 1.0), method, 50, 0.1, chunk_size=6)[
        0
    ]
    # Same code, same process, same seed: bit-identical (bound 0).
    assert torch.equal(kept, ref)  # exact: same route (same code, same process, same seed)
