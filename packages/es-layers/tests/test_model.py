"""PerturbedModel (NESgpu's wrapper and the seed README's recipe) and perturb() conversion."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import altgrad.es_layers as es
from altgrad.es_layers import PerturbedLinear, PerturbedModel  # the seed README's import, changed


class Net(nn.Module):
    def __init__(self, directions):
        super().__init__()
        self.fc1 = PerturbedLinear(4, 16, directions)
        self.fc2 = PerturbedLinear(16, 1, directions)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))

    def loss(self, x, y):
        return (self(x).squeeze(-1) - y).pow(2)


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.tanh(x @ torch.tensor([1.0, -2.0, 0.5, 1.5]))
    return x, y


def test_seed_readme_recipe_runs_as_written():
    torch.manual_seed(0)
    directions = 64
    # 1. replace the layers by perturbed versions, passing the population size
    base_model = Net(directions)
    # 2. wrap: base_model.f() evaluates, perturbed_model.f() runs the population
    perturbed_model = PerturbedModel(base_model, directions)
    optimizer = torch.optim.Adam(base_model.parameters(), lr=0.03)
    x_eval, y_eval = _data(512, seed=1)
    with torch.no_grad():
        start = base_model.loss(x_eval, y_eval).mean().item()
    examples = 8  # each member sees the same 8 examples with +E_k and with -E_k
    2 * examples
    for it in range(60):
        # 3.1 initialise the noise
        perturbed_model.set_noise()
        # 3.2 the loss under no_grad; input (repeat_size, directions, ...) flattened; 2nd half of repeats = -noise
        x, y = _data(examples, seed=100 + it)
        x = x.repeat(2, 1).repeat_interleave(
            directions, dim=0
        )  # (repeat_size * directions, 4), member fastest
        y = y.repeat(2).repeat_interleave(directions)
        with torch.no_grad():
            losses = perturbed_model.loss(x, y).view(2, examples, directions).sum(1)
        # 3.3 weights, set_grad, step
        weights = es.centered_ranks(es.antithetic_difference(losses.flatten()))
        optimizer.zero_grad()
        perturbed_model.set_grad(weights)
        optimizer.step()
    # 4. free the noise before saving
    perturbed_model.free_memory()
    buf = io.BytesIO()
    torch.save(base_model, buf)
    with torch.no_grad():
        end = base_model.loss(x_eval, y_eval).mean().item()
    assert end < 0.5 * start, (start, end)


def test_batch_equal_to_population_means_no_antithetic():
    torch.manual_seed(0)
    net = Net(8)
    pm = PerturbedModel(net, 8, seed=3)
    pm.set_noise()
    x = torch.randn(8, 4)
    with torch.no_grad():
        y = pm(x)
        y_loop = torch.stack([pm(torch.cat([x[i : i + 1]] * 8))[i] for i in range(8)])
    torch.testing.assert_close(y, y_loop)


def test_base_vs_perturbed_calls():
    torch.manual_seed(0)
    net = Net(4)
    pm = PerturbedModel(net, 4, seed=0)
    pm.set_noise()
    x = torch.randn(8, 4)
    y_base = net(x)
    with torch.no_grad():
        y_pop = pm(x)
        y_fwd = pm.forward(x)
        losses = pm.loss(x, torch.zeros(8))
    assert not torch.allclose(y_base, y_pop)
    assert torch.equal(y_pop, y_fwd)  # exact: same route (the same call)
    torch.testing.assert_close(losses, (y_pop.squeeze(-1)).pow(2))
    assert not net.fc1.perturbed_flag  # restored after every call
    assert torch.equal(net(x), y_base)  # exact: same route (the unperturbed network, restored)
    assert pm.fc1 is net.fc1  # attributes pass through
    with pm.perturbed():
        assert net.fc2.perturbed_flag
    assert not net.fc2.perturbed_flag


def test_layers_numbered_and_share_seed():
    net = Net(4)
    pm = PerturbedModel(net, 4, seed=42)
    assert [m.layer_index for m in pm.perturbed_layers] == [0, 1]
    assert {m.seed for m in pm.perturbed_layers} == {42}
    pm.set_seed(7)
    assert pm.seed == 7
    assert net.fc2.seed == 7
    pm.set_noise_scale(0.3)
    assert net.fc1.noise_scale == 0.3  # exact: a stored setting, not computed
    pm.set_noise(0.2)
    assert net.fc2.noise_scale == 0.2  # exact: a stored setting, not computed
    assert pm.step == 0
    assert pm.noise_memory_bytes > 0
    pm.free_memory()
    assert pm.noise_memory_bytes == 0


def test_update_accumulates_and_es_grads_names():
    torch.manual_seed(0)
    net = Net(4)
    pm = PerturbedModel(net, 4, seed=0)
    pm.set_noise()
    w = torch.tensor([1.0, -1.0, 0.5, 2.0])
    grads = pm.es_grads(w)
    assert set(grads) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    pm.set_grad(w)
    pm.update(w)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, 2 * grads[name])


def test_model_reproducible_from_seed():
    def run():
        torch.manual_seed(0)
        net = Net(4)
        pm = PerturbedModel(net, 4, seed=11)
        pm.set_noise()
        pm.set_noise()
        with torch.no_grad():
            return pm(torch.ones(8, 4))

    assert torch.equal(run(), run())  # exact: same route (determinism of one call)


def test_model_bad_input():
    with pytest.raises(TypeError, match="base_model"):
        PerturbedModel("net", 4)
    with pytest.raises(ValueError, match="no perturbed layer"):
        PerturbedModel(nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="directions"):
        PerturbedModel(Net(4), 8)
    with pytest.raises(ValueError, match="directions"):
        PerturbedModel(Net(4), 0)
    pm = PerturbedModel(Net(4), 4)
    with pytest.raises(RuntimeError, match="set_noise"):
        pm.set_grad(torch.ones(4))
    pm.set_noise()
    with pytest.raises(ValueError, match="flatten the first two"):
        pm(torch.ones(3, 4, 4))


# ----------------------------------------------------------------------------- perturb()


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


@pytest.mark.parametrize(
    ("mode", "options", "classes"),
    [
        ("iid", {}, (es.PerturbedConv2d, es.PerturbedLinear)),
        ("perturbed", {}, (es.PerturbedConv2d, es.PerturbedLinear)),
        ("flipout", {"flip": "both"}, (es.FlipoutConv2d, es.FlipoutLinear)),
        ("synthetic", {}, (es.FlipoutConv2d, es.FlipoutLinear)),
    ],
)
def test_perturb_converts_and_keeps_weights(mode, options, classes):
    torch.manual_seed(0)
    net = _cnn()
    params = list(net.parameters())
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        before = net(x)
    pm = es.perturb(net, 8, mode=mode, seed=1, **options)
    assert isinstance(net[0], classes[0])
    assert isinstance(net[4], classes[1])
    assert list(net.parameters()) == params  # same Parameter objects
    assert all(a is b for a, b in zip(net.parameters(), params))
    with torch.no_grad():
        assert torch.equal(net(x), before)  # exact: same route (unperturbed: the base class's forward)
    pm.set_noise()
    with torch.no_grad():
        assert not torch.allclose(pm(x), before)
    pm.set_grad(torch.randn(8))
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("mode", ["lowrank", "permuted"])
def test_perturb_lowrank_and_permuted(mode):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 5))
    es.perturb(net, 4, mode=mode)
    assert net[0].mode == mode
    assert net[2].mode == mode


def test_perturb_include_filter_and_options():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    pm = es.perturb(net, 16, mode="lowrank", rank=2, noise_scale=0.05, include=lambda name, m: name == "2")
    assert type(net[0]) is nn.Linear
    assert isinstance(net[2], es.LowRankLinear)
    assert net[2].rank == 2
    assert net[2].noise_scale == 0.05  # exact: a stored setting, not computed
    assert pm.perturbed_layers == [net[2]]


def test_perturb_skips_linear_subclasses_and_nested():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.inner = nn.Sequential(nn.Linear(8, 8))

    block = Block()
    es.perturb(block, 4, mode="flipout")
    assert type(block.attn.out_proj) is not es.FlipoutLinear
    assert isinstance(block.inner[0], es.FlipoutLinear)


def test_perturb_does_not_touch_global_rng():
    net = _cnn()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    es.perturb(net, 4, mode="flipout", seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # exact: byte tensors


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mode": "gaussian"}, ValueError, "mode"),
        ({"mode": 3}, TypeError, "mode"),
        ({"mode": "lowrank", "flip": "in"}, ValueError, "option"),
        ({"mode": "sparse"}, ValueError, "Conv2d"),
        ({"mode": "lowrank"}, ValueError, "groups"),
    ],
)
def test_perturb_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        es.perturb(_cnn(), 4, **kwargs)


def test_perturb_bad_models():
    with pytest.raises(ValueError, match="bare layer"):
        es.perturb(nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="no trainable parameter"):
        es.perturb(nn.Sequential(nn.ReLU()), 4)
    with pytest.raises(TypeError, match="model"):
        es.perturb(None, 4)


# ----------------------------------------------------------------------------- non-finite fitness (issue 12 item 7)
@pytest.mark.parametrize("method", ["set_grad", "update"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_fitness_never_moves_the_weights(method, bad):
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    pm = es.perturb(net, directions=8, mode="iid", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pm.set_noise()
    pm.set_grad(torch.linspace(-1, 1, 8))
    grads = [p.grad.clone() for p in net.parameters()]
    before = [p.detach().clone() for p in net.parameters()]
    fitness = torch.full((8,), bad)
    fitness[3] = 1.0
    with pytest.raises(ValueError, match="finite"):
        getattr(pm, method)(fitness)
    with pytest.raises(ValueError, match="finite"):
        getattr(pm, method)(es.centered_ranks(fitness))  # shaping keeps it NaN: no finite update sneaks in
    for p, g in zip(net.parameters(), grads):
        assert torch.equal(p.grad, g)  # exact: untouched (failed call); .grad untouched
    opt.step()  # the optimizer steps with the previous, finite gradient only
    expected = [b - 0.1 * g for b, g in zip(before, grads)]
    for p, e in zip(net.parameters(), expected):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), e)
