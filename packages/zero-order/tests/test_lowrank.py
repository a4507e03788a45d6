"""Low-rank (EGGROLL-style) directions: unbiased, factored layers equal the materialised perturbation."""

import pytest
import torch
import torch.nn.functional as F

import altgrad.zero_order as zo
import _bounds
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
    bound = _lowrank_bound(params, x, y, n=24, sigma=0.05, rank=2, seed=8, num_chunks=6)
    for pv, pl, g, bd in zip(nets["vmap"].parameters(), nets["loop"].parameters(), grads, bound):
        _bounds.assert_within(pv.grad, pl.grad, bd)
        _bounds.assert_within(pv.grad, g, bd)


def _lowrank_bound(params, x, y, n, sigma, rank, seed, num_chunks):
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
    fp, bp = _bounds.mlp_loss_and_bound(plus, x, y, torch.float32, extra[0][:n], extra[1][:n])
    fm, bm = _bounds.mlp_loss_and_bound(minus, x, y, torch.float32, extra[0][:n], extra[1][:n])
    return _bounds.estimate_difference_bound(
        "antithetic", params, z, sigma, fp, bp, fm, bm, num_chunks, z_mag=z_mag, terms=n * rank
    )


def test_invalid_directions():
    with pytest.raises(ValueError, match="directions"):
        zo.zero_order(zo.SeededNormal(0), directions="sparse")
    with pytest.raises(ValueError, match="rank"):
        zo.zero_order(zo.SeededNormal(0), directions="lowrank", rank=0)
