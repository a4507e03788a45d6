"""Low-rank (EGGROLL-style) directions: unbiased, factored layers equal the materialised perturbation."""

import _bounds
import pytest
import torch
import torch.nn.functional as F

import altgrad.zero_order as zo
from altgrad.zero_order import ZeroOrderGradientModule, estimate_gradient


@pytest.mark.parametrize("rank", [1, 3])
def test_lowrank_unbiased_on_linear_function(rank):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    theta = torch.zeros(4, 6, dtype=torch.float64)
    dist = zo.SeededNormal(2)
    est = torch.stack(
        [
            estimate_gradient(
                lambda t: (a * t).sum(), [theta], dist, "antithetic", 32, 0.3, directions="lowrank", rank=rank
            )[0]
            for _ in range(300)
        ]
    )
    se = est.std(0) / 300**0.5
    assert ((est.mean(0) - a).abs() <= 5 * se).all()
    # Rank-1 closed form: Var[ĝ_ij] = (‖a‖² + 2‖a_i·‖² + 2‖a_·j‖² + 4 a_ij² − a_ij²) / N for Gaussian factors.
    if rank == 1:
        var = (
            a.pow(2).sum() + 2 * a.pow(2).sum(1, keepdim=True) + 2 * a.pow(2).sum(0, keepdim=True) + 3 * a**2
        ) / 32
        ratio = est.var(0).sum() / var.sum()
        assert 0.75 < ratio < 1.25, ratio


def _net(batching, directions="lowrank"):
    class Net(ZeroOrderGradientModule, method="antithetic", num_samples=24, sigma=0.05, rank=2):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def forward(self, x, y):
            return F.mse_loss(self.m(x), y)

        def sample(self, sample_shape=()):
            return torch.randn(sample_shape)

        def zero_order_distribution(self):
            return zo.SeededNormal(8)

    class Configured(Net, batching=batching, directions=directions, chunk_size=10):
        pass

    return Configured()


def test_factored_module_matches_materialised_and_loop():
    x = torch.randn(12, 6)
    y = torch.randn(12, 1)
    nets = {b: _net(b) for b in ("vmap", "loop")}
    for net in nets.values():
        net(x, y).backward()
    ref = _net("vmap")
    names = [n for n, _ in ref.named_parameters()]
    params = [p.detach() for p in ref.parameters()]
    plain = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    grads = estimate_gradient(
        lambda *p: F.mse_loss(
            torch.func.functional_call(plain, dict(zip([n[2:] for n in names], p)), (x,)), y
        ),
        params,
        zo.SeededNormal(8),
        "antithetic",
        24,
        0.05,
        chunk_size=10,
        directions="lowrank",
        rank=2,
    )
    # Tolerance: the rounding-error bound of _bounds for three float32 computations of the same estimate
    # (factored vs materialised perturbations, vmap vs loop), evaluated on this data.
    bound = _bounds.lowrank_estimate_bound(params, x, y, n=24, sigma=0.05, rank=2, seed=8, num_chunks=6)
    for pv, pl, g, bd in zip(nets["vmap"].parameters(), nets["loop"].parameters(), grads, bound):
        _bounds.assert_within(pv.grad, pl.grad, bd)
        _bounds.assert_within(pv.grad, g, bd)


def test_invalid_directions():
    with pytest.raises(ValueError, match="directions"):
        zo.zero_order(zo.SeededNormal(0), directions="sparse")  # not a zero-order direction type
    with pytest.raises(ValueError, match="rank"):
        zo.zero_order(zo.SeededNormal(0), directions="lowrank", rank=0)


def test_flipout_unbiased_with_rademacher_shared_matrix():
    # E_k = diag(r_k) S diag(s_k): given S, Cov(E_k) = diag(S∘S) = I for a Rademacher S, so the antithetic estimate
    # of a linear f is unbiased; per coordinate Var[ĝ_ij] = (‖a‖² + a_ij²·(κ−2))/N with κ = 1 (signs): 5 SE.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    theta = torch.zeros(4, 6, dtype=torch.float64)
    dist = zo.SeededRademacher(3)
    est = torch.stack(
        [
            estimate_gradient(
                lambda t: (a * t).sum(), [theta], dist, "antithetic", 32, 0.3, directions="flipout"
            )[0]
            for _ in range(300)
        ]
    )
    var = (a.pow(2).sum() - a.pow(2)) / 32
    se = (var / 300).sqrt()
    assert ((est.mean(0) - a).abs() <= 5 * se).all()


def test_flipout_factored_module_matches_materialised_and_loop():
    # Factored nn.Linear layers run es-layers' flipout_linear under vmap; the decorator path materialises E_k.
    x = torch.randn(12, 6)
    y = torch.randn(12, 1)
    nets = {b: _net(b, directions="flipout") for b in ("vmap", "loop")}
    for net in nets.values():
        net(x, y).backward()
    ref = _net("vmap", directions="flipout")
    names = [n for n, _ in ref.named_parameters()]
    params = [p.detach() for p in ref.parameters()]
    plain = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    grads = estimate_gradient(
        lambda *p: F.mse_loss(
            torch.func.functional_call(plain, dict(zip([n[2:] for n in names], p)), (x,)), y
        ),
        params,
        zo.SeededNormal(8),
        "antithetic",
        24,
        0.05,
        chunk_size=10,
        directions="flipout",
    )
    # Tolerance: the rounding bound of _bounds (factored vs materialised, vmap vs loop), on this data.
    bound = _bounds.flipout_estimate_bound(params, x, y, n=24, sigma=0.05, seed=8, num_chunks=6)
    for pv, pl, g, bd in zip(nets["vmap"].parameters(), nets["loop"].parameters(), grads, bound):
        _bounds.assert_within(pv.grad, pl.grad, bd)
        _bounds.assert_within(pv.grad, g, bd)
