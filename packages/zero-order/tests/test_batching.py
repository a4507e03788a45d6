"""Batched (vmap) and looped population evaluation agree; chunking does not change results; auto fallback."""

import _bounds
import pytest
import torch
import torch.nn.functional as F

import altgrad.zero_order as zo
from altgrad.zero_order import ZeroOrderGradientModule, estimate_gradient, zero_order
from altgrad.zero_order.population import PopulationEvaluator


def _mlp_params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 6), (16,), (1, 16), (1,)]
    return [torch.randn(s, generator=g, dtype=dtype) * 0.3 for s in shapes]


def _mlp_loss(w1, b1, w2, b2, x, y):
    return F.mse_loss(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)


X = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(10, 1, generator=torch.Generator().manual_seed(2))


def _bound_for(method, params, n, sigma, seed, num_chunks, top_k=None):
    """Bound on |ĝ_a − ĝ_b| between two float32 computations of the same estimate (see _bounds)."""
    z = [zo.SeededNormal(seed).draw(p.shape, step=0, leaf=i, members=range(n)) for i, p in enumerate(params)]
    plus = [(p + sigma * zi) for p, zi in zip(params, z)]  # the float32-rounded perturbed leaves, as the code
    minus = [(p - sigma * zi) for p, zi in zip(params, z)]
    fp, bp = _bounds.mlp_loss_and_bound(plus, X, Y, torch.float32)
    fm, bm = _bounds.mlp_loss_and_bound(minus, X, Y, torch.float32)
    f0, b0 = _bounds.mlp_loss_and_bound([p.unsqueeze(0) for p in params], X, Y, torch.float32)
    return _bounds.estimate_difference_bound(
        method, params, z, sigma, fp, bp, fm, bm, num_chunks, top_k, f0=f0.item(), f0_bound=b0.item()
    )


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic", "es", "ars"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_vmap_and_loop_agree(method, chunk_size):
    params = _mlp_params()
    fn = lambda *p: _mlp_loss(*p, X, Y)  # noqa: E731
    kw = {"top_k": 5} if method == "ars" else {}
    n, sigma = 12, 0.05
    got = {}
    for batching in ("vmap", "loop"):
        got[batching] = estimate_gradient(
            fn, params, zo.SeededNormal(4), method, n, sigma, batching=batching, chunk_size=chunk_size, **kw
        )
    one_chunk = estimate_gradient(fn, params, zo.SeededNormal(4), method, n, sigma, batching="loop", **kw)
    # Tolerance: the rounding-error bound of _bounds.estimate_difference_bound, evaluated on this data: each
    # member's loss is within γ-bounds of its exact value (batched GEMMs may sum in any order), the weights
    # inherit that, and each side's accumulation Σ w_k z_k (with the in-place recovery) adds γ_{N+C+4} terms.
    chunks = (
        1 if chunk_size is None else -(-(2 * n if method in ("antithetic", "es", "ars") else n) // chunk_size)
    )
    bound = _bound_for(method, params, n, sigma, 4, chunks + 1, kw.get("top_k"))
    for a, b, c, bd in zip(got["vmap"], got["loop"], one_chunk, bound):
        _bounds.assert_within(a, b, bd)
        _bounds.assert_within(b, c, bd)


def test_auto_falls_back_to_loop_for_unvmappable_function():
    calls = {"n": 0}

    def f(w):
        calls["n"] += 1
        if w.sum().item() > 1e9:  # .item() cannot run under vmap
            return w.sum() * 0
        return (w**2).sum()

    ev = PopulationEvaluator(f, "auto")
    values = ev([torch.ones(4, 3)])
    assert ev.resolved == "loop"
    # exact: integer-valued; 1 + 1 + 1 is exact
    assert torch.equal(values, torch.full((4,), 3.0))  # 1 + 1 + 1 is exact
    with pytest.raises(RuntimeError):
        PopulationEvaluator(f, "vmap")([torch.ones(4, 3)])
    # Through the decorator: the decision is remembered for the decorated function.
    deco = zero_order(zo.SeededNormal(0), num_samples=6)(f)
    w = torch.ones(3, requires_grad=True)
    deco(w).backward()
    assert torch.isfinite(w.grad).all()


def test_auto_uses_vmap_when_possible():
    ev = PopulationEvaluator(lambda w: (w**2).sum(), "auto")
    ev([torch.ones(4, 3)])
    assert ev.resolved == "vmap"


def test_random_ops_inside_function_are_allowed():
    def f(w):
        return F.dropout(w, 0.5, training=True).sum()

    w = torch.ones(5, requires_grad=True)
    zero_order(zo.SeededNormal(0), num_samples=8, batching="vmap")(f)(w).backward()
    assert torch.isfinite(w.grad).all()


class _MLP(ZeroOrderGradientModule, method="antithetic", num_samples=9, sigma=0.05):
    def __init__(self, batching):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.noise = zo.SeededNormal(1)
        self.batching = batching

    def forward(self, x, y):
        return F.mse_loss(self.net(x), y)

    def sample(self, sample_shape=()):
        return torch.randn(sample_shape)

    def zero_order_distribution(self):
        return self.noise


def test_module_vmap_and_loop_agree():
    class Loop(_MLP, batching="loop"):
        pass

    class Vmap(_MLP, batching="vmap", chunk_size=4):
        pass

    torch.manual_seed(0)
    a = Vmap("vmap")
    b = Loop("loop")
    b.load_state_dict(a.state_dict())
    a(X, Y).backward()
    b(X, Y).backward()
    # Tolerance: the rounding-error bound of _bounds (same estimate, two float32 evaluation orders).
    params = [p.detach() for p in a.parameters()]
    bound = _bound_for("antithetic", params, 9, 0.05, 1, num_chunks=6)
    for pa, pb, bd in zip(a.parameters(), b.parameters(), bound):
        _bounds.assert_within(pa.grad, pb.grad, bd)
