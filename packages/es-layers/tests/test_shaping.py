"""Fitness shaping helpers: exact values, layout, bad input."""

import pytest
import torch

from altgrad.es_layers import antithetic_difference, centered_ranks, z_score


def test_centered_ranks_values():
    f = torch.tensor([3.0, -1.0, 10.0, 0.5, 7.0])
    expected = torch.tensor([0.0, -0.5, 0.5, -0.25, 0.25])
    assert torch.equal(centered_ranks(f), expected)  # exact: dyadic values (rank/4 − 0.5), exact in binary


def test_centered_ranks_matches_openai_reference():
    # OpenAI ES starter: ranks = x.argsort().argsort() over the flattened array, then / (n - 1) - 0.5
    f = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = f.flatten()
    ranks = x.argsort().argsort().double()
    ref = (ranks / (x.numel() - 1) - 0.5).reshape(7, 3)
    torch.testing.assert_close(centered_ranks(f), ref)
    assert centered_ranks(f.float()).shape == (7, 3)


def test_centered_ranks_ties_stable_and_ints():
    r = centered_ranks([1, 1, 0])
    assert r.dtype == torch.get_default_dtype()
    assert r.tolist() == [0.0, 0.5, -0.5]  # exact: dyadic values (rank/2 − 0.5), exact in binary
    # exact: a single value maps to 0 by construction
    assert centered_ranks(torch.tensor([4.0])).tolist() == [0.0]


def test_z_score_values():
    z = z_score(torch.tensor([1.0, 2.0, 3.0]), eps=0.0)
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0]) * (1.5**0.5))
    # exact: zero by construction (x − mean(x) = 0 for a constant x)
    assert z_score(torch.ones(4)).abs().max() == 0
    z = z_score(torch.randn(100, dtype=torch.float64), eps=0)
    assert abs(z.mean().item()) < 1e-12
    assert abs(z.std(correction=0).item() - 1) < 1e-12


def test_antithetic_difference_layout():
    # population of 2 * 3: members 0..2 with +E first, then the same members with -E
    f = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    assert antithetic_difference(f).tolist() == [-9.0, -18.0, -27.0]  # exact: integer-valued differences
    f2 = torch.arange(8.0).reshape(4, 2)
    # exact: integer-valued differences
    assert torch.equal(antithetic_difference(f2), torch.full((2, 2), -4.0))


@pytest.mark.parametrize(
    ("fn", "arg", "exc", "match"),
    [
        (antithetic_difference, torch.ones(3), ValueError, "even"),
        (centered_ranks, torch.tensor(1.0), ValueError, "scalar"),
        (z_score, torch.tensor([]), ValueError, "empty"),
        (centered_ranks, torch.tensor([1 + 1j]), TypeError, "real"),
        (z_score, torch.tensor([True]), TypeError, "real"),
        (centered_ranks, "abc", TypeError, "fitness"),
    ],
)
def test_bad_input(fn, arg, exc, match):
    with pytest.raises(exc, match=match):
        fn(arg)


def test_z_score_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        z_score(torch.ones(2), eps=-1.0)


# ----------------------------------------------------------------------------- non-finite and low-precision fitness
@pytest.mark.parametrize("fn", [centered_ranks, z_score])
@pytest.mark.parametrize(
    "fitness",
    [
        torch.full((6,), float("nan")),
        torch.tensor([1.0, float("nan"), 3.0, 0.0]),
        torch.tensor([1.0, float("inf"), 3.0, 0.0]),
        torch.tensor([-float("inf"), 2.0]),
    ],
)
def test_non_finite_fitness_stays_non_finite(fn, fitness):
    # a NaN loss must never turn into a finite, plausible update (issue 12 item 7): every weight is NaN
    for f in (fitness, fitness.to(torch.bfloat16), fitness.double().reshape(-1, 1)):
        w = fn(f)
        assert w.shape == f.shape
        assert torch.isnan(w).all(), w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fitness_ranked_in_float32(dtype):
    # bf16 holds only 256 consecutive integers exactly: ranks must be computed (and returned) in float32
    f = torch.linspace(-3, 3, 2000).to(dtype)
    distinct = f.unique().numel()
    assert distinct > 400
    r = centered_ranks(f)
    assert r.dtype == torch.float32
    assert r.unique().numel() == f.numel()  # every position gets its own rank (ties broken by position)
    order = torch.argsort(f.float(), stable=True)
    ref = torch.empty(f.numel())
    ref[order] = torch.arange(f.numel(), dtype=torch.float32) / (f.numel() - 1) - 0.5
    # exact: same route (the same two ops, / (n − 1) and − 0.5, on the same integer ranks)
    assert torch.equal(r, ref)
    z = z_score(f)
    assert z.dtype == torch.float32
    ref_z = (f.double() - f.double().mean()) / (f.double().std(correction=0) + 1e-8)
    # float32 accumulation over 2000 values: relative error of mean/std <= n·eps32 ≈ 2.4e-4 worst case, |z| <= 2
    torch.testing.assert_close(z.double(), ref_z, rtol=0, atol=1e-3)
