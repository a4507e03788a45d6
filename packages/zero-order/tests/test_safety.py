"""No silent wrong results (issue 12): non-finite values, buffers of perturbed members, σ below the resolution."""

import warnings

import pytest
import torch

import altgrad.zero_order as zo
from altgrad.zero_order import ZeroOrderGradientModule, estimate_gradient, zero_order
from altgrad.zero_order.gradient import SigmaResolutionWarning

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("method", zo.METHODS)
@pytest.mark.parametrize("where", ["all-nan", "one-nan", "one-inf", "one-minus-inf"])
def test_non_finite_values_never_give_a_finite_gradient(method, where):
    # Centered ranks (es) rank NaN by position and top-b (ars) can drop the bad direction: both used to return a
    # finite, plausible step. Every method must now return an all-NaN gradient.
    a = torch.tensor([1.0, -2.0, 0.5])

    def f(t):
        value = a @ t
        if where == "all-nan":
            return value * NAN
        bad = {"one-nan": NAN, "one-inf": INF, "one-minus-inf": -INF}[where]
        # member 3's perturbation makes t[0] the largest: poison only that member (under vmap, by value)
        return torch.where(t[0] > 10.0, torch.tensor(bad), value)

    theta = torch.zeros(3)

    class Spike(zo.SeededNormal):
        def draw(self, shape, **kw):
            z = super().draw(shape, **kw)
            if 3 in kw["members"]:
                z[list(kw["members"]).index(3)] = torch.tensor([1e3, 0.0, 0.0])
            return z

    dist = Spike(0)
    (g,) = estimate_gradient(f, [theta], dist, method, 8, 0.1, **({"top_k": 2} if method == "ars" else {}))
    assert torch.isnan(g).all(), g


def test_non_finite_through_the_decorator_and_module():
    w = torch.zeros(3, requires_grad=True)
    zero_order(zo.SeededNormal(0), method="es", num_samples=6)(lambda w: w.sum() * NAN)(w).backward()
    assert torch.isnan(w.grad).all()

    class Net(ZeroOrderGradientModule, method="ars", num_samples=6, top_k=2):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self):
            return self.w.sum() * NAN

        def sample(self, sample_shape=()):
            return torch.randn(sample_shape)

    net = Net()
    net().backward()
    assert torch.isnan(net.w.grad).all()


class _BN(ZeroOrderGradientModule, method="antithetic", num_samples=50, sigma=0.1):
    def __init__(self, batching="auto"):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.noise = zo.SeededNormal(0)

    def forward(self, x):
        return self.bn(self.fc(x)).pow(2).mean()

    def sample(self, sample_shape=()):
        return torch.randn(sample_shape)

    def zero_order_distribution(self):
        return self.noise


@pytest.mark.parametrize("batching", ["auto", "vmap", "loop"])
def test_batchnorm_running_stats_updated_once_per_estimate(batching):
    cls = type("BN", (_BN,), {}, batching=batching)
    net = cls()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        ref(net.fc(x))  # one plain training forward
    net(x).backward()
    # Only the unperturbed forward updates the buffers: exactly what one plain forward does.
    assert net.bn.num_batches_tracked.item() == 1  # exact: integer counter
    # exact: same route (one plain BatchNorm forward on the same input)
    assert torch.equal(net.bn.running_mean, ref.running_mean)
    assert torch.equal(net.bn.running_var, ref.running_var)  # exact: same route, as above
    assert torch.isfinite(net.fc.weight.grad).all()
    # Members use their own batch statistics in training mode: the estimate matches a loop over members that
    # normalise with batch statistics (F.batch_norm without running stats).
    if batching == "auto":
        assert net._zero_order_batching[cls] == "vmap"


class _Counter(ZeroOrderGradientModule, method="naive", num_samples=8, sigma=0.1):
    """A buffer updated in place, then `.item()`: the vmap attempt updates and fails, the loop runs; no trace."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("calls", torch.zeros(()))
        self.noise = zo.SeededNormal(0)

    def forward(self, x):
        self.calls.add_(1)
        if self.w.sum().item() > 1e9:  # cannot run under vmap
            return self.w.sum() * 0
        return (self.w * x).sum()

    def sample(self, sample_shape=()):
        return torch.randn(sample_shape)

    def zero_order_distribution(self):
        return self.noise


def test_failed_vmap_attempt_and_loop_leave_buffers_untouched():
    net = _Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net(torch.ones(3)).backward()
    assert net._zero_order_batching[_Counter] == "loop"
    assert net.calls.item() == 1  # exact: integer counter; the unperturbed forward only
    assert torch.isfinite(net.w.grad).all()


def test_sigma_below_resolution_warns():
    p = torch.ones(4, dtype=torch.bfloat16)
    with pytest.warns(SigmaResolutionWarning, match=r"sigma=0\.0001.*bfloat16.*max \|θ\| = 1"):
        (g,) = estimate_gradient(lambda t: t.float().sum(), [p], zo.SeededNormal(0), "antithetic", 8, 1e-4)
    assert (g == 0).all()  # what the warning is about: every perturbation rounded away
    # float32 at the same scale resolves σ = 1e-4 (eps·|θ| = 1.2e-7): no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_gradient(lambda t: t.sum(), [torch.ones(4)], zo.SeededNormal(0), "antithetic", 8, 1e-4)
    # the decorator warns too
    w = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    f = zero_order(zo.SeededNormal(0), method="naive", num_samples=4, sigma=1e-3)(lambda w: w.float().sum())
    with pytest.warns(SigmaResolutionWarning):
        f(w).backward()
