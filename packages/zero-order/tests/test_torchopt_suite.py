"""Every name and module path TorchOpt's own zero-order tests use (issue 14), exercised the way they use them.

TorchOpt's `tests/test_zero_order.py` (metaopt/torchopt main) imports `torchopt.diff.zero_order`,
`torchopt.nn.ZeroOrderGradientModule`, `torchopt.adam`, `torchopt.apply_updates`, `torchopt.Adam` and
`torchopt.diff.zero_order.nn.module.enable_zero_order_gradients`; its `tests/test_import.py` checks the module
paths below. These are our own tests in the same shapes, with `import altgrad.zero_order.compat as torchopt`;
where TorchOpt only checks that nothing raises, we also check values.
"""

import importlib
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import altgrad.zero_order.compat as torchopt
from altgrad.zero_order import ZeroOrderGradientModule, zero_order

BATCH, DIM, NUM_SAMPLES = 8, 32, 500


class FcNet(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.fc = nn.Linear(in_features=dim, out_features=out, bias=True)

    def forward(self, x):
        return self.fc(x)


def _data():
    g = torch.Generator().manual_seed(42)
    return torch.randn(BATCH, DIM, generator=g) * 0.1, torch.randn(BATCH, 1, generator=g) * 0.1


def _cos(a, b):
    return F.cosine_similarity(
        torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b]), dim=0
    )


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
@pytest.mark.parametrize("sigma", [0.01, 1.0])
def test_zero_order_functional_as_torchopt_tests(method, sigma):
    torch.manual_seed(42)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # functorch.make_functional is deprecated upstream
        import functorch

        fmodel, params = functorch.make_functional(FcNet(DIM, 1))
    x, y = _data()

    @torchopt.diff.zero_order(
        distribution=torch.distributions.Normal(loc=0, scale=1),
        method=method,
        argnums=0,
        sigma=sigma,
        num_samples=NUM_SAMPLES,
    )
    def forward_process(params, fn, x, y):
        return F.mse_loss(fn(params, x), y)

    optimizer = torchopt.adam(lr=1e-2)
    opt_state = optimizer.init(params)
    first = None
    for _ in range(5):
        loss = forward_process(params, fmodel, x, y)
        first = loss.item() if first is None else first
        grads = torch.autograd.grad(loss, params)
        updates, opt_state = optimizer.update(grads, opt_state)
        params = torchopt.apply_updates(params, updates)
    assert all(torch.isfinite(g).all() for g in grads)
    if method != "naive" and sigma == 0.01:  # exact: a test parameter, not a computed float
        # A value check TorchOpt lacks: for a loss that is quadratic in θ, antithetic is exact up to the noise
        # of a linear f, and forward adds σ/2·zᵀHz·z (negligible at σ = 0.01). With N = 500 and D = 33 the
        # relative noise norm is √((D+1)/N) ≈ 0.26, so E[cos] ≈ 0.97; cos ≤ 0.5 needs a noise norm 6.6× its
        # expectation (χ² with 33 dof: p < 1e-12). (At σ = 1 forward's curvature term dominates: no check.)
        ps = tuple(p.detach().requires_grad_() for p in params)
        true = torch.autograd.grad(F.mse_loss(fmodel(ps, x), y), ps)
        est = torch.autograd.grad(forward_process(ps, fmodel, x, y), ps)
        assert _cos(est, true) > 0.5


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
def test_zero_order_module_as_torchopt_tests(method):
    torch.manual_seed(42)

    class FcNetWithLoss(
        torchopt.nn.ZeroOrderGradientModule, method=method, sigma=0.1, num_samples=NUM_SAMPLES
    ):
        def __init__(self, dim, out):
            super().__init__()
            self.net = FcNet(dim, out)
            self.loss = nn.MSELoss()
            self.distribution = torch.distributions.Normal(loc=0, scale=1)

        def forward(self, x, y):
            return self.loss(self.net(x), y)

        def sample(self, sample_shape=torch.Size()):  # noqa: B008
            return self.distribution.sample(sample_shape)

    x, y = _data()
    model = FcNetWithLoss(DIM, 1)
    optimizer = torchopt.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_module_enable_zero_order_gradients_twice():
    class MyModule(torchopt.nn.ZeroOrderGradientModule):
        def forward(self):
            return torch.tensor(0.0)

        def sample(self, sample_shape):
            return torch.tensor(0.0)

    from altgrad.zero_order.compat.diff.zero_order.nn.module import enable_zero_order_gradients

    with pytest.raises(
        TypeError,
        match=re.escape("Zero-order gradient estimation is already enabled for the `forward` method."),
    ):
        enable_zero_order_gradients(MyModule)


def test_enable_zero_order_gradients_on_a_plain_module():
    # TorchOpt's building block also works on its own: it wraps forward and uses the class's `sample`.
    from altgrad.zero_order.compat.diff.zero_order.nn.module import enable_zero_order_gradients

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(self, a):
            return a @ self.w

        def sample(self, sample_shape=torch.Size()):  # noqa: B008
            return torch.randn(sample_shape, dtype=torch.float64)

    assert enable_zero_order_gradients(Plain, method="antithetic", num_samples=4000, sigma=0.1) is Plain
    a = torch.tensor([1.0, -2.0, 0.5])
    torch.manual_seed(0)
    net = Plain()
    net(a).backward()
    # Antithetic, Gaussian z, linear f: Var[g_i] = (|a|² + a_i²)/N; 5 standard deviations.
    tol = 5 * ((a.pow(2).sum() + a.pow(2)) / 4000).sqrt()
    assert ((net.w.grad - a).abs() <= tol).all()
    with pytest.raises(TypeError, match="already enabled"):
        enable_zero_order_gradients(Plain)
    with pytest.raises(TypeError, match=re.escape("nn.Module")):
        enable_zero_order_gradients(object)


def test_module_empty_parameters():
    class MyModule(torchopt.nn.ZeroOrderGradientModule):
        def forward(self):
            return torch.tensor(0.0)

        def sample(self, sample_shape):
            return torch.tensor(0.0)

    with pytest.raises(RuntimeError, match=re.escape("The module has no parameters.")):
        MyModule()()


def test_module_abstract_methods():
    class MyModule1(torchopt.nn.ZeroOrderGradientModule):
        def forward(self):
            return torch.tensor(0.0)

    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        MyModule1()

    class MyModule2(torchopt.nn.ZeroOrderGradientModule):
        def sample(self, sample_shape):
            return torch.tensor(0.0)

    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        MyModule2()


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("altgrad.zero_order.compat", ["diff", "nn", "adam", "Adam", "apply_updates", "typing"]),
        ("altgrad.zero_order.compat.diff", ["zero_order"]),
        (
            "altgrad.zero_order.compat.diff.zero_order",
            ["zero_order", "ZeroOrderGradientModule", "nn", "decorator"],
        ),
        ("altgrad.zero_order.compat.diff.zero_order.decorator", ["zero_order"]),
        ("altgrad.zero_order.compat.diff.zero_order.nn", ["ZeroOrderGradientModule", "module"]),
        (
            "altgrad.zero_order.compat.diff.zero_order.nn.module",
            ["ZeroOrderGradientModule", "enable_zero_order_gradients"],
        ),
        ("altgrad.zero_order.compat.nn", ["ZeroOrderGradientModule"]),
        ("altgrad.zero_order.compat.typing", ["Samplable", "SampleFunc"]),
    ],
)
def test_torchopt_module_paths(path, names):
    # TorchOpt's tests/test_import.py checks these paths; every class is ours.
    mod = importlib.import_module(path)
    for name in names:
        assert hasattr(mod, name), f"{path}.{name}"
    if hasattr(mod, "ZeroOrderGradientModule"):
        assert mod.ZeroOrderGradientModule is ZeroOrderGradientModule
    if path.endswith("decorator"):
        assert mod.zero_order is zero_order
    # `torchopt.diff.zero_order` is itself callable, like TorchOpt's module.
    assert callable(torchopt.diff.zero_order)
    assert isinstance(torch.distributions.Normal(0.0, 1.0), torchopt.typing.Samplable)
