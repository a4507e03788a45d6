"""Synthetic inputs (ForwardInterface) and the complete unlock (BidirectionalInterface), main API."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altgrad.dni import DNI, BidirectionalInterface, ForwardInterface, LinearDNI


def linear(n_in, n_out, seed):
    """A linear synthesizer with random (not zero) weights, so that every value below is non-trivial."""
    torch.manual_seed(seed)
    s = LinearDNI(n_in, 1, n_out, num_layers=0)
    with torch.no_grad():
        s.final.weight.normal_()
        s.final.bias.normal_()
    return s


# fp32 sums of <= 8 O(1) products: |error| <= 8·2⁻²⁴·Σ|terms| < 1e-5 for these sizes.
TOL = {"rtol": 0, "atol": 1e-5}


def test_forward_interface_regresses_on_h_and_returns_the_detached_prediction():
    synth = linear(3, 4, 0)
    iface = ForwardInterface(synth)
    h = torch.randn(5, 4, requires_grad=True)
    trigger = torch.randn(5, 3, requires_grad=True)
    out = iface(h, trigger)
    pred = trigger.detach() @ synth.final.weight.T + synth.final.bias
    torch.testing.assert_close(out, pred.detach(), **TOL)
    assert not out.requires_grad
    assert h.grad is None
    assert trigger.grad is None
    d = 2 * (pred - h) / 5  # gradient of ‖ĥ − h‖² / B
    torch.testing.assert_close(synth.final.weight.grad, (d.T @ trigger).detach(), **TOL)
    torch.testing.assert_close(iface.last_loss, ((pred - h) ** 2).sum().detach() / 5, **TOL)
    iface.mode = "observe"
    assert iface(h, trigger) is h
    iface.mode = "dni"
    iface.eval()
    assert iface(h, trigger) is h


def test_forward_interface_steps_its_optimizer_and_reads_context():
    synth = LinearDNI(3 + 2, 32, 4, num_layers=1)
    opt = torch.optim.SGD(synth.parameters(), lr=0.1)
    iface = ForwardInterface(synth, context_size=2, optimizer=opt)
    torch.manual_seed(0)
    h, trigger, labels = torch.randn(6, 4), torch.randn(6, 3), torch.randint(0, 2, (6,))
    before = synth.final.weight.clone()
    first = iface(h, trigger, labels).clone()
    assert torch.count_nonzero(first) == 0  # zero-initialised last layer
    assert not torch.equal(before, synth.final.weight)  # exact: any change counts
    assert synth.final.weight.grad is None
    for _ in range(200):
        iface(h, trigger, labels)
    assert iface.last_loss < 0.05 * ((h**2).sum() / 6)  # learns to reproduce h from (trigger, label)
    with pytest.raises(ValueError, match="shape"):
        iface(torch.randn(6, 5), trigger, labels)
    with pytest.raises(ValueError, match="batch"):
        iface(h, torch.randn(5, 3), labels)
    with pytest.raises(ValueError, match="context"):
        iface(h, trigger)


def test_complete_unlock_values():
    torch.manual_seed(0)
    lower, upper = nn.Linear(3, 4), nn.Linear(4, 2)
    fwd, bwd = linear(3, 4, 1), linear(4, 4, 2)
    iface = BidirectionalInterface(fwd, bwd, scale=0.5)
    x = torch.randn(5, 3)
    h = lower(x)
    out = iface(h, x)
    syn = x @ fwd.final.weight.T + fwd.final.bias  # the synthetic input
    torch.testing.assert_close(out, syn.detach(), **TOL)
    sg = h.detach() @ bwd.final.weight.T + bwd.final.bias  # M at the real h
    torch.testing.assert_close(lower.weight.grad, 0.5 * sg.T @ x, **TOL)  # update unlocked, at forward time
    grad_lower = lower.weight.grad.clone()
    upper(out).pow(2).sum().backward()
    # exact: untouched
    assert torch.equal(lower.weight.grad, grad_lower)  # nothing from the loss reaches the block below
    g = 2 * upper(syn.detach()) @ upper.weight  # gradient arriving at the synthetic input
    pred = syn.detach() @ bwd.final.weight.T + bwd.final.bias  # M at the synthetic input
    d = (2 * (pred - g) / 5).detach()
    torch.testing.assert_close(bwd.final.bias.grad, d.sum(0), **TOL)
    torch.testing.assert_close(bwd.final.weight.grad, d.T @ syn.detach(), **TOL)


def test_bidirectional_modes_and_state_dict_keys():
    iface = BidirectionalInterface(linear(3, 4, 1), linear(4, 4, 2))
    assert sorted(iface.state_dict()) == [
        "backward_interface.synthesizer.final.bias",
        "backward_interface.synthesizer.final.weight",
        "forward_interface.synthesizer.final.bias",
        "forward_interface.synthesizer.final.weight",
    ]
    lower = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    ref = copy.deepcopy(lower)
    iface.mode = "observe"  # real activations and true gradients, both synthesizers trained
    F.mse_loss(iface(lower(x), x), torch.ones(5, 4)).backward()
    F.mse_loss(ref(x), torch.ones(5, 4)).backward()
    # exact: same route (observe mode is plain autograd on a copy)
    assert torch.equal(lower.weight.grad, ref.weight.grad)
    assert iface.forward_interface.synthesizer.final.weight.grad is not None
    assert iface.backward_interface.synthesizer.final.weight.grad is not None
    iface.mode = "backprop"
    h = lower(x)
    assert iface(h, x) is h
    with pytest.raises(ValueError, match="mode"):
        iface.mode = "fast"


def test_complete_unlock_trains_a_classifier():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 2
    y = torch.randint(0, 4, (512,))
    x = centres[y] + torch.randn(512, 16)
    lower = nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32)
    )
    upper = nn.Sequential(nn.ReLU(), nn.Linear(32, 4))
    iface = BidirectionalInterface(LinearDNI(16 + 4, 64, 32), LinearDNI(32 + 4, 64, 32), context_size=4)
    opt = torch.optim.Adam([*lower.parameters(), *upper.parameters(), *iface.parameters()], lr=3e-3)
    for _step in range(150):
        i = torch.randint(0, 512, (64,))
        opt.zero_grad()
        F.cross_entropy(upper(iface(lower(x[i]), x[i], y[i])), y[i]).backward()
        opt.step()
    for m in (lower, upper, iface):
        m.eval()
    with torch.no_grad():
        accuracy = (upper(iface(lower(x), x)).argmax(1) == y).float().mean()
    assert accuracy > 0.9  # four separable clusters; chance is 0.25


# ---------------------------------------------------------------- the wrapper: DNI(..., synthetic_inputs=True)
def test_wrapper_synthetic_inputs_feed_the_layers_above():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    dni = DNI(net, hidden_size=16, grad_optim="sgd", grad_lr=0.1, lr=0.1, synthetic_inputs=True)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    for _ in range(3):
        net[2].zero_grad()
        F.cross_entropy(dni(x), y).backward()
    dni.step_optimizers()  # apply pending synthesizer updates now, so the next forward uses these weights
    fwd = dni.forward_interfaces["0"]
    expected = net[2](F.relu(fwd.synthetic_input(x, torch.empty(10, 8))))
    w0 = net[0].weight.detach().clone()
    out = dni(x)
    # exact: same route (the same kernels on the same synthetic input)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the head ran on I(x), not on net[0](x)
    # exact: any change counts
    assert not torch.equal(w0, net[0].weight)  # net[0] was updated from M(h) during the forward pass
    assert len(list(dni.synthesizer_parameters())) == 6 + 6  # M (LinearDNI: 3 Linear) and I
    dni.eval()
    with torch.no_grad():
        plain = net[2](F.relu(net[0](x)))
        # exact: same route (eval runs the plain network)
        assert torch.equal(dni(x), plain)  # eval: real activations


def test_wrapper_synthetic_inputs_checkpoint_and_errors(tmp_path):
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    dni = DNI(net(), hidden_size=4, synthetic_inputs=True)
    dni(torch.randn(4, 1, 2, 3)).sum().backward()  # the trigger is flattened to (B, 6)
    state = dni.state_dict()
    assert dni.forward_interfaces["1"].synthesizer.input_size == 6
    assert any(k.startswith("forward_interfaces.1.synthesizer.") for k in state)
    fresh = DNI(net(), hidden_size=4, synthetic_inputs=True)
    fresh.load_state_dict(state)  # the forward synthesizer is rebuilt from the saved trigger size
    for k, v in fresh.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), k  # exact: restored state
    with pytest.raises(ValueError, match="lam=0"):
        DNI(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), lam=0.5, synthetic_inputs=True)
    with pytest.raises(TypeError, match="first positional argument"):
        dni(input=torch.randn(4, 1, 2, 3))


def test_wrapper_complete_unlock_trains_a_classifier():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 2
    y = torch.randint(0, 4, (512,))
    x = centres[y] + torch.randn(512, 16)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    dni = DNI(net, hidden_size=64, context_size=4, synthetic_inputs=True, lr=3e-3, grad_lr=3e-3)
    opt = torch.optim.Adam(net[4].parameters(), 3e-3)
    for _ in range(150):
        i = torch.randint(0, 512, (64,))
        opt.zero_grad()
        F.cross_entropy(dni(x[i], context=y[i]), y[i]).backward()
        opt.step()
    dni.eval()
    with torch.no_grad():
        assert (dni(x).argmax(1) == y).float().mean() > 0.9  # four separable clusters; chance is 0.25
