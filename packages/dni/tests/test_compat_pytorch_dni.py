"""pytorch-dni HEAD (ixaxaar/pytorch-dni e8e5281): its tests, demo and tasks/mnist/fcn.py logic, import changed.

The peer's test scripts only print; here the same calls are made and values are asserted.
"""

import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from altgrad.dni import DNI, RNNDNI, LinearBatchNormDNI, LinearDNI, detach_all, get_padding


def test_simple():  # test/test_simple.py
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 10))
    dni_net = DNI(net, hidden_size=16, λ=0.5, recursive=True)
    input_data = torch.randn(5, 10, requires_grad=True)
    dni_net.train()
    output = dni_net(input_data)
    assert output.shape == (5, 10)
    output.sum().backward()
    assert input_data.grad is not None  # BP(0.5) passes half the true gradient down


def test_comprehensive_lambda_loop_on_one_network():  # test/test_comprehensive_dni.py
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 15), nn.ReLU(), nn.Linear(15, 5))
    wrappers = []
    for lam in [-1, 0.0, 0.5, 1.0]:
        with pytest.warns(UserWarning, match="detached") if wrappers else _nothing():
            dni_net = DNI(net, hidden_size=16, λ=lam, recursive=True, skip_last_layer=True)
        wrappers.append(dni_net)
        dni_net.train()
        output = dni_net(torch.randn(8, 10, requires_grad=True))
        F.mse_loss(output, torch.randn(8, 5)).backward()
        dni_net.step_optimizers()
        assert output.shape == (8, 5)
    # Only the newest wrapper drives the network: λ=1 is exact backprop for the wrapped layers' gradient.
    assert all(not w._hooks for w in wrappers[:-1])
    ref = pickle.loads(pickle.dumps(net))
    for m in ref.modules():
        m._forward_hooks.clear()
    x, y = torch.randn(8, 10), torch.randn(8, 5)
    last = wrappers[-1]
    last.network.zero_grad()
    F.mse_loss(last(x), y).backward()  # the wrapper steps its layers in backward; compare the head's gradient
    F.mse_loss(ref(x), y).backward()
    # exact: same route (the head's gradient is plain autograd in both)
    torch.testing.assert_close(net[4].weight.grad, ref[4].weight.grad, rtol=0, atol=0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_rnn_with_format_fn(lam):  # test/test_rnn_dni.py, test_comprehensive_dni.py::test_rnn_dni
    torch.manual_seed(0)
    rnn = nn.LSTM(input_size=20, hidden_size=30, num_layers=2, batch_first=True)
    before = [p.detach().clone() for p in rnn.parameters()]
    dni_rnn = DNI(rnn, dni_network=RNNDNI, hidden_size=16, λ=lam, recursive=False, format_fn=lambda x: x[0])
    dni_rnn.train()
    input_data = torch.randn(5, 10, 20, requires_grad=True)
    output, hidden = dni_rnn(input_data)
    assert output.shape == (5, 10, 30)
    assert hidden[0].shape == (2, 5, 30)
    output.sum().backward()
    dni_rnn.step_optimizers()
    # λ=0: the zero-initialised synthesizer sends 0, Adam's first step on a zero gradient is 0: unchanged.
    # λ=0.5: half the true gradient reaches the LSTM, which the wrapper steps with Adam: every tensor moves.
    # exact: any change counts; a zero gradient gives Adam an exactly zero step
    moved = [not torch.equal(a, b) for a, b in zip(before, rnn.parameters())]
    assert all(moved) if lam == 0.5 else not any(moved)  # exact: a test parameter, not a computed float
    # The true gradient stops at the interface for λ=0 (only the zero synthetic gradient reaches the input).
    # exact: a test parameter, not a computed float
    assert (torch.count_nonzero(input_data.grad) > 0) == (lam == 0.5)


def test_format_fn_must_return_an_element_of_the_output():
    dni = DNI(nn.Linear(3, 4), recursive=False, format_fn=lambda out: out * 2)
    with pytest.raises(ValueError, match="format_fn must return one of the tensors"):
        dni(torch.randn(2, 3))
    with pytest.raises(TypeError, match="format_fn"):
        DNI(nn.Linear(3, 4), recursive=False, format_fn=3)


def test_lambda_minus_one_sends_true_plus_synthetic_gradient():
    torch.manual_seed(0)
    layer, head = nn.Linear(3, 4), nn.Linear(4, 2)
    dni = DNI(layer, hidden_size=1, dni_params={"num_layers": 0}, λ=-1, recursive=False, update_modules=False)
    synth = dni.interface("").synthesizer.final
    with torch.no_grad():
        synth.weight.normal_(), synth.bias.normal_()
    x = torch.randn(5, 3)
    head(dni(x)).pow(2).sum().backward()
    h = (x @ layer.weight.T + layer.bias).detach()
    g = 2 * head(h) @ head.weight  # the true gradient at h
    s = h @ synth.weight.T + synth.bias  # the synthetic one
    # fp32 sums of <= 5 O(1) products: |error| <= 5·2⁻²⁴·Σ|terms| < 1e-5.
    torch.testing.assert_close(layer.weight.grad, ((g + s).T @ x).detach(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exactly -1"):
        DNI(nn.Linear(3, 4), λ=-0.5, recursive=False)


def test_step_optimizers_applies_pending_synthesizer_updates_once():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3))
    dni_net = DNI(net, hidden_size=8, λ=0.0, recursive=True, skip_last_layer=True)
    synth = dni_net.interface("0").synthesizer
    w0 = synth.final.weight.detach().clone()
    F.mse_loss(dni_net(torch.randn(16, 5)), torch.randn(16, 3)).backward()
    # exact: untouched
    assert torch.equal(synth.final.weight, w0)  # pending until the next forward or step_optimizers()
    dni_net.step_optimizers()
    w1 = synth.final.weight.detach().clone()
    assert not torch.equal(w1, w0)  # exact: any change counts
    assert synth.final.weight.grad is None
    dni_net.step_optimizers()
    assert torch.equal(synth.final.weight, w1)  # exact: untouched (nothing pending)


def test_demo_lambda_comparison_with_an_outer_optimizer():  # examples/complete_dni_demo.py
    torch.manual_seed(0)
    finals = {}
    for lam in [1.0, 0.5, 0.0, -1]:
        net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))
        dni_net = DNI(net, hidden_size=16, λ=lam, recursive=True, skip_last_layer=True)
        optimizer = optim.Adam(dni_net.parameters(), lr=0.01)
        losses = []
        for _epoch in range(150):
            x = torch.randn(16, 10)
            y = torch.sum(x, dim=1, keepdim=True)
            optimizer.zero_grad()
            loss = F.mse_loss(dni_net(x), y)
            loss.backward()
            dni_net.step_optimizers()
            optimizer.step()
            losses.append(loss.item())
        finals[lam] = sum(losses[-10:]) / sum(losses[:10])
    assert all(r < 0.5 for r in finals.values()), (
        finals
    )  # every λ learns the linear target (loss at least halves)


image_size = 8


class FCNNet(nn.Module):  # tasks/mnist/fcn.py, with 8x8 digits-sized inputs and 64 hidden units
    def __init__(self, num_layers=3, hidden_size=64, dni_layers=(), lam=0):
        super().__init__()
        self.num_layers, self.hidden_size, self.lam = num_layers, hidden_size, lam
        self.net = [
            self.dni(self.layer(image_size * image_size if l == 0 else hidden_size, hidden_size))
            if l in dni_layers
            else self.layer(image_size * image_size if l == 0 else hidden_size, hidden_size)
            for l in range(self.num_layers)  # noqa: E741 (the peer's name)
        ]
        self.final = self.layer(hidden_size, 10)
        for ctr, n in enumerate(self.net):
            setattr(self, "layer" + str(ctr), n)

    def layer(self, input_size, hidden_size):
        return nn.Sequential(nn.Linear(input_size, hidden_size), nn.BatchNorm1d(hidden_size))

    def dni(self, layer):
        return DNI(
            layer,
            hidden_size=64,
            dni_network=LinearBatchNormDNI,
            λ=self.lam,
            grad_optim="adam",
            grad_lr=1e-3,
            gpu_id=-1,
            recursive=False,
        )

    def forward(self, x):
        output = x.view(-1, image_size * image_size)
        for layer in self.net:
            output = F.relu(layer(output))
        return F.log_softmax(self.final(output), dim=-1)


def test_mnist_fcn_task_logic():
    torch.manual_seed(1)
    centres = torch.randn(10, 64) * 2
    target_all = torch.randint(0, 10, (512,))
    data_all = centres[target_all] + torch.randn(512, 64)
    dni_layers = [0, 1, 2]
    model = FCNNet(num_layers=3, dni_layers=dni_layers, lam=getattr(type("A", (), {"lambda": 0}), "lambda"))
    final_layer_opt = optim.Adam(model.final.parameters(), lr=1e-3)
    non_dni_layers = set(range(model.num_layers)).difference(dni_layers)
    non_dni_layers_opt = [optim.Adam(model.net[layer].parameters(), lr=1e-3) for layer in non_dni_layers]
    model.train()
    losses = []
    for _step in range(150):
        i = torch.randint(0, 512, (64,))
        data, target = data_all[i], target_all[i]
        final_layer_opt.zero_grad()
        [x.zero_grad() for x in non_dni_layers_opt]
        loss = F.nll_loss(model(data), target)
        loss.backward()
        final_layer_opt.step()
        [x.step() for x in non_dni_layers_opt]
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(data_all).argmax(1) == target_all).float().mean().item()
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert accuracy > 0.9


def test_mnist_fcn_task_imports_and_private_dni_class():
    """tasks/mnist/fcn.py's two import lines with ``dni`` → ``altgrad.dni``, then pytorch-dni's ``_DNI``
    called in its own positional order: it wraps every parameterised leaf but the last, with 10-wide
    synthesizers by default, and trains (``optimize()`` after ``backward()``, as ``_DNI`` users call it)."""
    ns: dict = {}
    exec("from altgrad.dni import *\nfrom altgrad.dni import _DNI\n", ns)  # the task's imports, verbatim
    assert ns["DNI"] is DNI
    assert ns["LinearBatchNormDNI"] is LinearBatchNormDNI
    private = ns["_DNI"]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    model = private(net, None, None, "adam", 1e-2)  # network, dni_network, optim, grad_optim, grad_lr
    assert isinstance(model, DNI)
    assert list(model.interfaces) == ["0", "2"]  # the last Linear is left to the loss
    assert model.interfaces["0"].synthesizer.layers[0].out_features == 10  # hidden_size=None -> 10
    assert model.lam == 0.5  # exact: a stored default, not computed (_DNI's default λ)
    opt = optim.Adam(net[4].parameters(), lr=1e-2)
    w = torch.randn(8, 1)
    x = torch.randn(256, 8)
    y = x @ w
    model.train()
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        model.optimize()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10]), losses[::15]  # learns the linear target
    unlocked = private(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1)), λ=0, decouple_forwards=True)
    assert unlocked.synthetic_inputs
    with pytest.raises(ValueError, match="synthetic_inputs=True is the complete unlock"):
        private(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1)), decouple_forwards=True)  # λ=0.5


def test_get_padding_and_detach_all_have_pytorch_dni_values():
    assert get_padding(28, 5, 1, 1) == 16  # floor((28·1 + 4·1 + 1) / 2), pytorch-dni's formula
    assert get_padding(32, 3, 2, 1) == 18  # floor((32 + 2·2 + 1) / 2)
    assert get_padding(7, 3, 1, 2) == 8  # floor((14 + 2 + 1) / 2)
    with pytest.raises(ValueError, match="kernel_size"):
        get_padding(28, 0, 1, 1)
    t = torch.ones(2, requires_grad=True) * 2
    out = detach_all({"a": [t, (t, 3)], "b": t})
    assert not out["a"][0].requires_grad
    assert not out["a"][1][0].requires_grad
    assert out["a"][1][1] == 3


def test_missing_attribute_names_the_wrapper():
    dni = DNI(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    with pytest.raises(AttributeError, match=r"'DNI' object \(wrapping Sequential\) has no attribute 'nope'"):
        dni.nope  # noqa: B018
    assert dni.network[0].in_features == 3
    with pytest.raises(ValueError, match="gpu_id"):
        DNI(nn.Linear(3, 4), recursive=False, gpu_id=-2)


def test_pytorch_dni_defaults_accept_none():
    dni = DNI(network=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), dni_network=None, hidden_size=None)
    assert isinstance(dni.interface("0").synthesizer, LinearDNI)
    assert dni.interface("0").synthesizer.hidden_size == 256
    with pytest.raises(TypeError, match="hidden_size"):
        DNI(nn.Linear(3, 4), LinearDNI, recursive=False)  # pytorch-dni's positional order: a clear error
    with pytest.raises(TypeError, match="once"):
        DNI(nn.Linear(3, 4), network=nn.Linear(3, 4))
