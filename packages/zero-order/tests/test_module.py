"""ZeroOrderGradientModule: TorchOpt behaviour plus keyword args, sub-subclasses and frozen parameters."""

import _bounds
import pytest
import torch
import torch.nn.functional as F

import altgrad.zero_order as zo
from altgrad.zero_order import ZeroOrderGradientModule, zero_order


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


class Net(ZeroOrderGradientModule, method="antithetic", num_samples=20, sigma=0.1):
    def __init__(self, seed=0):
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)
        self.noise = zo.SeededNormal(seed)

    def forward(self, x, y=None):
        return F.mse_loss(self.fc(x), y)

    def sample(self, sample_shape=()):
        return self.noise.sample(sample_shape)

    def zero_order_distribution(self):
        return self.noise


def test_class_keywords_and_kwargs_forward():
    x, y = _data()
    net = Net()
    assert Net._zero_order_options.method == "antithetic"
    loss = net(x, y=y)
    # exact: same route (the centre is the plain forward, F.linear); bit-identical
    assert loss.item() == F.mse_loss(net.fc(x), y).item()  # the same ops on the same data: bit-identical
    loss.backward()
    assert net.fc.weight.grad.shape == (1, 4)
    assert net.fc.bias.grad.shape == (1,)


def test_module_matches_decorator_with_same_noise():
    x, y = _data()
    net = Net(seed=3)
    net(x, y).backward()

    @zero_order(zo.SeededNormal(3), method="antithetic", num_samples=20, sigma=0.1)
    def f(params, x, y):
        return F.mse_loss(F.linear(x, *params), y)

    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    grads = torch.autograd.grad(f(params, x, y), params)
    # Tolerance: the rounding bound of _bounds for two float32 computations of the same estimate
    # (functional_call of nn.Linear vs F.linear under vmap may sum in different orders).
    params = [p.detach() for p in net.parameters()]
    d = zo.SeededNormal(3)
    z = [d.draw(p.shape, step=0, leaf=i, members=range(20)) for i, p in enumerate(params)]
    fp, bp = _bounds.linear_loss_and_bound(*(p + 0.1 * zi for p, zi in zip(params, z)), x, y, torch.float32)
    fm, bm = _bounds.linear_loss_and_bound(*(p - 0.1 * zi for p, zi in zip(params, z)), x, y, torch.float32)
    bound = _bounds.estimate_difference_bound("antithetic", params, z, 0.1, fp, bp, fm, bm)
    _bounds.assert_within(net.fc.weight.grad, grads[0], bound[0])
    _bounds.assert_within(net.fc.bias.grad, grads[1], bound[1])


def test_sub_subclass_inherits_and_overrides_keywords():
    class Child(Net):
        pass

    class Other(Net, sigma=0.5):
        pass

    class Own(Net, num_samples=3):
        def forward(self, x, y=None):
            return super().forward(x, y) * 2  # calling the parent's forward must not start a nested estimate

    assert Child._zero_order_options == Net._zero_order_options
    assert Other._zero_order_options.sigma == 0.5  # exact: a stored option, not computed
    assert Other._zero_order_options.method == "antithetic"
    assert Own._zero_order_options.num_samples == 3
    x, y = _data()
    for cls in (Child, Other, Own):
        net = cls()
        loss = net(x, y)
        loss.backward()
        assert torch.isfinite(net.fc.weight.grad).all()
    own = Own()
    # exact: same route (plain forward); ×2 is exact
    assert own(x, y).item() == 2 * F.mse_loss(own.fc(x), y).item()  # same ops; ×2 is exact


def test_frozen_parameters_are_not_perturbed():
    x, y = _data()
    net = Net()
    net.fc.bias.requires_grad_(False)
    seen = []
    original = net.noise.draw

    def spy(shape, **kw):
        seen.append(tuple(shape))
        return original(shape, **kw)

    net.noise.draw = spy
    net(x, y).backward()
    assert seen == [(1, 4)]  # the bias is frozen: only the weight draws noise
    assert net.fc.bias.grad is None
    assert net.fc.weight.grad is not None


def test_all_frozen_returns_plain_loss():
    x, y = _data()
    net = Net()
    net.requires_grad_(False)
    loss = net(x, y)
    assert not loss.requires_grad


def test_no_parameters_error():
    class Empty(ZeroOrderGradientModule):
        def forward(self, x):
            return x.sum()

        def sample(self, sample_shape=()):
            return torch.randn(sample_shape)

    with pytest.raises(RuntimeError) as info:
        Empty()(torch.ones(2))
    assert str(info.value) == "The module has no parameters."


def test_abstract_methods():
    class NoSample(ZeroOrderGradientModule):
        def forward(self, x):
            return x.sum()

    class NoForward(ZeroOrderGradientModule):
        def sample(self, sample_shape=()):
            return torch.randn(sample_shape)

    for cls in (NoSample, NoForward, ZeroOrderGradientModule):
        with pytest.raises(TypeError, match="Can't instantiate abstract class"):
            cls()


def test_invalid_class_keyword():
    with pytest.raises(AssertionError):

        class Bad(ZeroOrderGradientModule, method="sideways"):
            pass


def test_default_sample_is_used_and_called_with_batched_shape():
    shapes = []

    class N2(ZeroOrderGradientModule, num_samples=5):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return (self.w * x).sum()

        def sample(self, sample_shape=()):
            shapes.append(tuple(sample_shape))
            return torch.randn(sample_shape)

    N2()(torch.ones(3)).backward()
    assert shapes == [(5, 3)]


def test_workspace_is_reused_and_not_pickled():
    import io

    x, y = _data()
    net = Net()
    net(x, y).backward()
    workspace = net._zero_order_workspace
    # the chunk's stacked perturbed parameters, or (nn.Linear fast path) the layer outputs, are kept
    buffers = {**workspace.buffers, **workspace.scratch_buffers}
    assert buffers
    net(x, y).backward()
    assert all({**workspace.buffers, **workspace.scratch_buffers}[k] is v for k, v in buffers.items())
    blob = io.BytesIO()
    torch.save(net, blob)
    blob.seek(0)
    copy = torch.load(blob, weights_only=False)
    assert "_zero_order_workspace" not in copy.__dict__
    copy(x, y).backward()  # a new workspace is made on demand
    net.zero_order_release_workspace()
    assert "_zero_order_workspace" not in net.__dict__


@pytest.mark.parametrize("method", ["antithetic", "naive", "es"])
@pytest.mark.parametrize("reg", [0.0, 0.5])
def test_module_that_reads_a_linear_weight_directly_matches_estimate_gradient(method, reg):
    # The module API's nn.Linear fast path builds W ± σz next to its GEMM; a forward that also reads the weight
    # directly (an L2 term here) must see the same perturbed weight. In float64 the two computations differ only by
    # summation order: per member |Δf| <= γ_n Σ|terms| with n <= 16 and u = 2^-53 (about 1e-14 here), divided by
    # σ = 0.05 and summed over 9 members with |z| <= 6, i.e. < 1e-10; a missed perturbation is O(0.1..1).
    import torch.nn.functional as F

    from altgrad.zero_order import SeededNormal, ZeroOrderGradientModule, estimate_gradient

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    y = torch.randn(10, 1, generator=g, dtype=torch.float64)

    class Net(ZeroOrderGradientModule, method=method, num_samples=9, sigma=0.05, chunk_size=4):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.noise = SeededNormal(1)

        def forward(self, x, y):
            out = F.mse_loss(self.net(x), y)
            return out + reg * self.net[0].weight.square().sum()

        def sample(self, sample_shape=torch.Size()):  # noqa: B008
            return torch.randn(sample_shape)

        def zero_order_distribution(self):
            return self.noise

    torch.manual_seed(0)
    model = Net().double()
    model(x, y).backward()
    params = [p.detach().clone() for p in model.parameters()]

    def fn(w1, b1, w2, b2):
        out = F.mse_loss(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)
        return out + reg * w1.square().sum()

    ref = estimate_gradient(fn, params, SeededNormal(1), method, 9, 0.05, chunk_size=4)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=0, atol=1e-9)
