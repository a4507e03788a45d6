"""The module API's ``nn.Linear`` fast path against the general dense path (`estimate_gradient`).

On the CPU, `ZeroOrderGradientModule` never stacks the dense-perturbed weight and bias of an ``nn.Linear`` that only
its own forward reads: the layer runs ``es_layers.functional.perturbed_linear`` on the chunk (a layer whose input is
shared by all members computes ``x Wᵀ ± σ x z_kᵀ``, a layer with per-member inputs multiplies by ``W ± σ z_k`` built
a few members at a time) and keeps its output in the module's workspace between chunks and estimates. Every layout below must give the estimate of the general path, which
materialises ``W ± σ z_k`` and calls the plain function under ``vmap``.

Tolerance (float64, u = 2^-53): the two paths differ only in summation order. Per member the loss differs by at
most γ_n Σ|terms| with inner dimensions n ≤ 16 and |terms| = O(10) here, i.e. below 1e-13; the estimate divides
by σ = 0.05 and sums at most 9 members with |z| ≤ 6, so |Δg| < 1e-13 · 6 · 9 / 0.05 ≈ 1e-10 < atol = 1e-9. A
perturbation that is lost, applied to the wrong member or overwritten by another call moves the estimate by
O(0.1..1).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import altgrad.es_layers.functional as EF
from altgrad.zero_order import SeededNormal, ZeroOrderGradientModule, estimate_gradient

SIGMA, N, CHUNK = 0.05, 9, 4


def _net(layout: str, method: str) -> ZeroOrderGradientModule:
    class Net(ZeroOrderGradientModule, method=method, num_samples=N, sigma=SIGMA, chunk_size=CHUNK):
        def __init__(self) -> None:
            super().__init__()
            bias = layout != "no-bias"
            self.first = torch.nn.Linear(6, 6, bias=bias)
            self.last = torch.nn.Linear(6, 1, bias=bias)
            if layout == "tied-bias":  # one bias parameter in two layers: perturbed alike in both
                self.second = torch.nn.Linear(6, 6)
                self.second.bias = self.first.bias
            if layout == "frozen-bias":
                self.first.bias.requires_grad_(False)
                self.last.bias.requires_grad_(False)
            self.noise = SeededNormal(3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = self.first(x)
            if layout == "twice":  # the same layer again, on per-member input, its first output still in use
                h = h + self.first(torch.tanh(h))
            h = torch.tanh(h)
            if layout == "tied-bias":
                h = torch.tanh(self.second(h))
            out = self.last(h)
            if layout == "scalar-view":  # the loss is a view into the last layer's output
                return out.reshape(-1)[0]
            return F.mse_loss(out, y)

        def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
            return torch.randn(sample_shape)

        def zero_order_distribution(self) -> SeededNormal:
            return self.noise

    torch.manual_seed(0)
    return Net().double()


def _reference(net: ZeroOrderGradientModule, layout: str, method: str, x: torch.Tensor, y: torch.Tensor):
    names = [name for name, p in net.named_parameters() if p.requires_grad]
    params = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    frozen = {name: p for name, p in net.named_parameters() if not p.requires_grad}

    def fn(*leaves: torch.Tensor) -> torch.Tensor:
        w = dict(zip(names, leaves), **frozen)

        def first(t: torch.Tensor) -> torch.Tensor:
            return F.linear(t, w["first.weight"], w.get("first.bias"))

        h = first(x)
        if layout == "twice":
            h = h + first(torch.tanh(h))
        h = torch.tanh(h)
        if layout == "tied-bias":
            h = torch.tanh(F.linear(h, w["second.weight"], w["first.bias"]))
        out = F.linear(h, w["last.weight"], w.get("last.bias"))
        if layout == "scalar-view":
            return out.reshape(-1)[0]
        return F.mse_loss(out, y)

    noise = copy.deepcopy(net.noise)  # at the step of the module's next estimate
    return estimate_gradient(fn, params, noise, method, N, SIGMA, chunk_size=CHUNK)


@pytest.mark.parametrize("method", ["naive", "antithetic", "es"])
@pytest.mark.parametrize(
    "layout", ["bias", "no-bias", "frozen-bias", "twice", "3-d input", "scalar-view", "tied-bias"]
)
@pytest.mark.parametrize("blocked_min_rows", [0, 1 << 30])  # per-member inputs: W ± σz_k built, or x zᵀ added
def test_fast_path_matches_the_general_path(layout, method, blocked_min_rows, monkeypatch):
    monkeypatch.setattr(EF.iid, "_BLOCKED_MIN_ROWS", blocked_min_rows)
    calls = {"shared": 0, "member": 0}
    original = EF.iid._perturbed_linear_no_grad

    def counted(x, *args):
        calls["shared" if x.stride(0) == 0 else "member"] += 1
        return original(x, *args)

    monkeypatch.setattr(EF.iid, "_perturbed_linear_no_grad", counted)

    g = torch.Generator().manual_seed(1)
    shape = (3, 4, 6) if layout == "3-d input" else (10, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn((*shape[:-1], 1), generator=g, dtype=torch.float64)
    net = _net(layout, method)
    for it in range(2):  # the second estimate reuses the workspace's outputs
        ref = _reference(net, layout, method, x, y)
        net(x, y).backward()
        for p, r in zip((p for p in net.parameters() if p.requires_grad), ref):
            torch.testing.assert_close(p.grad, r, rtol=0, atol=1e-9, msg=f"estimate {it}")
            p.grad = None
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1)
    # both layouts of the fast path ran; layers holding a tied bias take the general path
    assert (calls["shared"] > 0) == (layout != "tied-bias")
    assert calls["member"] > 0


@pytest.mark.parametrize("method", ["es", "ars"])
def test_values_that_view_reused_buffers_are_kept(method):
    # A function returning a view of its (perturbed) input: the chunk's stacked leaf lives in a workspace reused
    # by the next chunk, so the values of the two-pass methods must be copies. Same computation, so bit-identical.
    p = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    viewed = estimate_gradient(lambda t: t[0], [p], SeededNormal(0), method, 8, 0.1, chunk_size=4)
    copied = estimate_gradient(lambda t: t[0].clone(), [p], SeededNormal(0), method, 8, 0.1, chunk_size=4)
    # exact: same route (the same computation; only the buffers differ)
    assert torch.equal(viewed[0], copied[0])


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic", "es"])
def test_noise_drawn_into_reused_buffers_is_the_same_noise(method, monkeypatch):
    # One-pass methods draw a `Normal`'s noise into buffers reused from chunk to chunk (torch.randn(out=) on the
    # same generator); two-pass methods keep every chunk's noise and must not. Same numbers either way: bit-identical.
    from altgrad.zero_order import directions

    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    normal = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))

    def estimate():
        torch.manual_seed(5)
        return estimate_gradient(
            lambda t: (t @ w.T).square().sum(), [torch.ones(3)], normal, method, 10, 0.1, chunk_size=4
        )

    keys = []
    original = directions.Workspace.scratch

    def recording(self, key, *args):
        keys.append(key)
        return original(self, key, *args)

    monkeypatch.setattr(directions.Workspace, "scratch", recording)
    reused = estimate()
    assert (("noise", 0) in keys) == (method != "es")
    monkeypatch.setattr(
        directions.Workspace,
        "scratch",
        lambda self, key, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device),
    )
    fresh = estimate()
    # exact: same route (the same computation; only the buffers differ)
    assert torch.equal(reused[0], fresh[0])
