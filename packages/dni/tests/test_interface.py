"""The low-level primitive: update unlocking, bootstrapping, RNN boundaries, modes and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altgrad.dni import BackwardInterface, LinearDNI


def _randomise(synth: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in synth.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return synth


def test_zero_init_sends_exactly_zero_gradient_at_step_zero():
    torch.manual_seed(0)
    block = nn.Linear(5, 4)
    iface = BackwardInterface(LinearDNI(4, 8, 4))
    x = torch.randn(3, 5, requires_grad=True)
    h = iface(block(x))
    # The synthetic gradient was applied during the forward pass: gradients exist, and are exactly zero.
    assert x.grad is not None
    assert torch.count_nonzero(x.grad) == 0
    assert torch.count_nonzero(block.weight.grad) == 0
    F.mse_loss(h, torch.ones(3, 4)).backward()
    assert torch.count_nonzero(x.grad) == 0  # the true gradient stops at the interface


def test_block_below_is_updated_from_the_synthetic_gradient_at_forward_time():
    torch.manual_seed(0)
    block = nn.Linear(5, 4)
    synth = _randomise(LinearDNI(4, 8, 4, num_layers=1))
    iface = BackwardInterface(synth, scale=0.5)
    x = torch.randn(3, 5)
    h = block(x)
    sg = iface.synthetic_gradient(h)
    iface(h)
    (expected,) = torch.autograd.grad(block(x), block.weight, 0.5 * sg)
    torch.testing.assert_close(block.weight.grad, expected)


def test_observe_mode_is_backprop_and_trains_the_synthesizer_on_the_true_gradient():
    torch.manual_seed(0)
    block, head = nn.Linear(5, 4), nn.Linear(4, 2)
    synth = LinearDNI(4, 8, 4)
    iface = BackwardInterface(synth, mode="observe", diagnostics=True)
    x, y = torch.randn(3, 5), torch.randn(3, 2)
    h = block(x)
    F.mse_loss(head(iface(h)), y).backward()
    grads = [block.weight.grad.clone(), block.bias.grad.clone()]
    block.zero_grad()
    h2 = block(x)
    (true_h,) = torch.autograd.grad(F.mse_loss(head(h2), y), h2, retain_graph=True)
    F.mse_loss(head(h2), y).backward()
    assert torch.equal(grads[0], block.weight.grad)  # exact: same route (observe mode is plain autograd)
    assert torch.equal(grads[1], block.bias.grad)  # exact: same route (observe mode is plain autograd)
    torch.testing.assert_close(iface.last_target, true_h)
    assert synth.final.weight.grad is not None  # the synthesizer learned from it


def test_stacked_interfaces_bootstrap():
    torch.manual_seed(0)
    l1, l2, l3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 2)
    s1, s2 = _randomise(LinearDNI(6, 8, 6), 1), _randomise(LinearDNI(4, 8, 4), 2)
    i1 = BackwardInterface(s1, diagnostics=True)
    i2 = BackwardInterface(s2, diagnostics=True)
    x, y = torch.randn(3, 5), torch.randn(3, 2)
    h1 = l1(x)
    a1 = torch.relu(i1(h1))
    h2 = l2(a1)
    sg2 = i2.synthetic_gradient(h2)
    out = l3(i2(h2))
    # Interface 1's target arrived during interface 2's forward: interface 2's synthetic gradient
    # back-propagated through the block between them (bootstrapping), not the true gradient.
    h1r = h1.detach().requires_grad_()
    (expected1,) = torch.autograd.grad(l2(torch.relu(h1r)), h1r, sg2)
    torch.testing.assert_close(i1.last_target, expected1)
    h2r = h2.detach().requires_grad_()
    (expected2,) = torch.autograd.grad(F.mse_loss(l3(h2r), y), h2r)
    F.mse_loss(out, y).backward()
    torch.testing.assert_close(i2.last_target, expected2)  # the top interface sees the true gradient


def test_deferred_injection_gives_the_same_gradients_as_immediate():
    def run(inject):
        torch.manual_seed(0)
        l1, l2 = nn.Linear(5, 6), nn.Linear(6, 2)
        iface = BackwardInterface(_randomise(LinearDNI(6, 8, 6)), inject=inject, diagnostics=True)
        x = torch.randn(3, 5)
        F.mse_loss(l2(torch.tanh(iface(l1(x)))), torch.ones(3, 2)).backward()
        return l1.weight.grad, l2.weight.grad, iface.last_target

    for a, b in zip(run("immediate"), run("deferred")):
        torch.testing.assert_close(a, b)


def test_skip_connection_needs_deferred_injection():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)

    def step(inject):
        iface0 = BackwardInterface(_randomise(LinearDNI(4, 8, 4)), inject=inject)
        iface1 = BackwardInterface(_randomise(LinearDNI(4, 8, 4)), inject=inject)
        x = iface0(nn.Linear(3, 4)(torch.randn(2, 3)))
        y = iface1(lin(x)) + x  # x reaches the loss by two paths
        y.sum().backward()

    with pytest.raises(RuntimeError, match="inject='deferred'"):
        step("immediate")
    step("deferred")


def test_bp_lambda_mixes_true_and_synthetic_gradients():
    torch.manual_seed(0)
    block = nn.Linear(5, 4)
    iface = BackwardInterface(_randomise(LinearDNI(4, 8, 4)), lam=0.25, scale=2.0)
    x = torch.randn(3, 5)
    h = block(x)
    sg = iface.synthetic_gradient(h)
    g = torch.randn(3, 4)
    iface(h).backward(g)
    (expected,) = torch.autograd.grad(block(x), block.weight, 0.25 * g + 0.75 * 2.0 * sg)
    torch.testing.assert_close(block.weight.grad, expected)


def test_rnn_boundary_target_includes_the_injected_synthetic_gradient():
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4)
    iface = BackwardInterface(_randomise(LinearDNI(8, 8, 8, num_layers=1)), scale=0.1, diagnostics=True)
    xs = torch.randn(5, 2, 3)
    state0 = (torch.randn(2, 4), torch.randn(2, 4))

    def unroll(state):
        loss = 0.0
        for x in xs:
            state = cell(x, state)
            loss = loss + state[0].pow(2).mean()
        return loss, state

    loss, final = unroll(iface.trigger(state0))
    extra = iface.inject(final)
    # exact: zero by construction
    assert float(extra.detach()) == 0.0  # a zero-valued term: the logged loss is unchanged
    sg_end = 0.1 * iface.synthetic_gradient(final)
    (loss + extra).backward()

    ref = tuple(s.clone().requires_grad_() for s in state0)
    loss_r, final_r = unroll(ref)
    surrogate = loss_r + (torch.cat(final_r, dim=-1) * sg_end).sum()
    expected = torch.cat(torch.autograd.grad(surrogate, ref), dim=-1)
    torch.testing.assert_close(iface.last_target, expected)
    # Without the injected term the target would differ.
    plain = torch.cat(torch.autograd.grad(unroll(ref)[0], ref), dim=-1)
    assert not torch.allclose(plain, expected)


def test_trigger_returns_the_same_structure():
    iface = BackwardInterface(LinearDNI(8, 4, 8))
    h, c = torch.zeros(2, 4), torch.zeros(2, 4)
    out = iface.trigger((h, c))
    assert isinstance(out, tuple)
    assert len(out) == 2
    assert torch.equal(out[0], h)  # exact: identity by construction
    assert isinstance(iface.trigger([h, c]), list)
    assert isinstance(iface.trigger(torch.zeros(2, 8)), torch.Tensor)


def test_synthesizer_optimizer_steps_when_the_target_arrives():
    torch.manual_seed(0)
    synth = LinearDNI(4, 8, 4, num_layers=0)
    opt = torch.optim.SGD(synth.parameters(), lr=0.1)
    iface = BackwardInterface(synth, optimizer=opt)
    block = nn.Linear(3, 4)
    before = synth.final.weight.detach().clone()
    out = iface(block(torch.randn(2, 3)))
    assert torch.equal(synth.final.weight, before)  # exact: untouched; no target yet
    out.sum().backward()
    # exact: any change counts
    assert not torch.equal(synth.final.weight, before)  # stepped inside the backward pass
    assert synth.final.weight.grad is None


def test_linear_synthesizer_converges_to_the_true_gradient_on_linear_regression():
    # Czarnecki et al. 2017: with an MSE loss and a linear model the true gradient is an affine function of
    # the activation, so a linear synthesizer can represent it exactly; the regression has no noise.
    torch.manual_seed(0)
    block, head = nn.Linear(4, 4), nn.Linear(4, 2)
    a = torch.randn(2, 4)
    with torch.no_grad():
        block.weight.copy_(torch.eye(4) + 0.3 * torch.randn(4, 4))  # invertible: x is affine in h
    for p in [*block.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    block.weight.requires_grad_(True)  # the block below must be trainable for the interface to act
    synth = LinearDNI(4, 1, 4, num_layers=0)
    iface = BackwardInterface(synth, optimizer=torch.optim.SGD(synth.parameters(), lr=0.1), mode="observe")
    for _ in range(300):
        x = torch.randn(32, 4)
        F.mse_loss(head(iface(block(x))), x @ a.T).backward()
    x = torch.randn(32, 4)
    h = block(x).detach().requires_grad_()
    (true_grad,) = torch.autograd.grad(F.mse_loss(head(h), x @ a.T), h)
    rel = (iface.synthetic_gradient(h) - true_grad).norm() / true_grad.norm()
    assert rel < 1e-4, float(rel)


def test_conditional_interface_uses_labels():
    torch.manual_seed(0)
    iface = BackwardInterface(_randomise(LinearDNI(4 + 3, 8, 4)), context_size=3)
    h = torch.randn(2, 4)
    labels = torch.tensor([0, 2])
    by_int = iface.synthetic_gradient(h, labels)
    by_onehot = iface.synthetic_gradient(h, F.one_hot(labels, 3).float())
    torch.testing.assert_close(by_int, by_onehot)
    assert not torch.allclose(by_int, iface.synthetic_gradient(h, torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="conditional"):
        iface.synthetic_gradient(h)
    with pytest.raises(ValueError, match="out-of-range"):
        iface.synthetic_gradient(h, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(B, context_size\)"):
        iface.synthetic_gradient(h, torch.zeros(2, 5))


def test_eval_and_backprop_modes_are_pass_through():
    iface = BackwardInterface(LinearDNI(4, 8, 4))
    h = torch.randn(2, 4, requires_grad=True)
    iface.eval()
    assert iface(h) is h
    iface.train()
    iface.mode = "backprop"
    assert iface(h) is h
    assert float(iface.inject(h)) == 0.0  # exact: zero by construction


def test_bad_input_is_rejected_with_clear_errors():
    with pytest.raises(TypeError, match="synthesizer"):
        BackwardInterface(lambda x: x)
    with pytest.raises(ValueError, match="lam"):
        BackwardInterface(LinearDNI(2, 2, 2), lam=1.5)
    with pytest.raises(ValueError, match="inject"):
        BackwardInterface(LinearDNI(2, 2, 2), inject="later")
    with pytest.raises(ValueError, match="mode"):
        BackwardInterface(LinearDNI(2, 2, 2), mode="fast")
    with pytest.raises(TypeError, match="optimizer"):
        BackwardInterface(LinearDNI(2, 2, 2), optimizer="adam")
    iface = BackwardInterface(LinearDNI(3, 4, 3))
    with pytest.raises(ValueError, match="cannot produce"):
        iface(torch.randn(2, 3, 5, 5, requires_grad=True))  # a feature map: shape mismatch
    with pytest.raises(TypeError, match="state"):
        iface.trigger("state")


@pytest.mark.parametrize("inject", ["immediate", "deferred"])
def test_a_second_backward_pass_through_an_interface_is_refused(inject):
    """A target arrives once per prediction. A second backward pass through the same graph (retain_graph=True)
    would be a second target for a prediction already trained on: refused with an error that says why, on the
    unlocked cut (a leaf's hook) as on the connected boundary (an autograd Function)."""
    torch.manual_seed(0)
    block, upper = nn.Linear(5, 4), nn.Linear(4, 2)
    iface = BackwardInterface(_randomise(LinearDNI(4, 8, 4)), inject=inject)
    out = upper(iface(block(torch.randn(3, 5))))
    out.sum().backward(retain_graph=True)
    assert iface.last_loss is not None
    with pytest.raises(RuntimeError, match="two separate backward passes"):
        out.sum().backward()


def test_the_unlocked_output_may_be_modified_in_place_and_the_synthesizer_reads_the_original():
    """The unlocked output is an alias of the activation (no copy for the layers above); the synthesizer, which reads
    the bare activation here (no context), reads a copy, so an in-place op above changes neither its input nor its
    target's meaning."""
    torch.manual_seed(0)
    block, upper = nn.Linear(5, 4), nn.Linear(4, 2)
    iface = BackwardInterface(_randomise(LinearDNI(4, 8, 4)), diagnostics=True)
    h = block(torch.randn(3, 5))
    original = h.detach().clone()
    out = iface(h)
    assert torch.equal(out, h)  # exact: the same values
    assert out.data_ptr() == h.data_ptr()  # an alias, not a copy
    torch.relu_(out)
    upper(out).sum().backward()
    expected = (upper.weight.sum(0) * (original > 0)).expand(3, 4)  # d/d(out) of sum(upper(relu(h)))
    torch.testing.assert_close(iface.last_target, expected, rtol=0, atol=0)  # exact: products with 0 and 1
    assert torch.equal(iface.last_prediction, iface.synthetic_gradient(original))  # it read the original h


def test_a_parameter_through_an_interface_may_not_be_modified_in_place():
    """An interface on a parameter (or a view of one) returns a view, which autograd refuses to modify in place,
    as it refuses for the parameter itself; an alias would let the write reach the parameter silently."""
    state = nn.Parameter(torch.ones(2, 4))
    for kwargs in ({}, {"lam": 0.5}):
        iface = BackwardInterface(LinearDNI(4, 8, 4), **kwargs)
        for tensor in (state, state[0:1]):
            out = iface.trigger(tensor) if kwargs else iface(tensor)
            with pytest.raises(RuntimeError, match="view"):
                out.mul_(0.5)
    assert torch.equal(state.detach(), torch.ones(2, 4))  # exact: untouched


def test_an_undefined_gradient_above_the_interface_is_a_zero_target():
    """A layer above that sends no gradient (a custom Function returning None) gives the synthesizer a zero
    target, as autograd materialises it."""

    class NoGradForFirst(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, g):
            return None, g

    torch.manual_seed(0)
    iface = BackwardInterface(_randomise(LinearDNI(4, 8, 4)), diagnostics=True)
    out = iface(nn.Linear(4, 4)(torch.randn(3, 4)))
    NoGradForFirst.apply(out, torch.randn(3, 4, requires_grad=True)).sum().backward()
    assert torch.count_nonzero(iface.last_target) == 0
    assert iface._pending == 0


def test_integer_labels_become_the_one_hot_context_and_bad_labels_are_refused():
    from altgrad.dni.interface import one_hot_labels

    labels = torch.tensor([3, 0, 9, 3])
    assert torch.equal(one_hot_labels(labels, 10), F.one_hot(labels, 10).float())  # exact: zeros and ones
    assert one_hot_labels(labels.int(), 10).dtype == torch.get_default_dtype()
    assert one_hot_labels(torch.zeros(0, dtype=torch.long), 4).shape == (0, 4)
    for bad in ([0, -1], [0, 10]):
        with pytest.raises(ValueError, match=r"must be in \[0, 10\)"):
            one_hot_labels(torch.tensor(bad), 10)
    with pytest.raises(ValueError, match=r"\(B,\) labels"):
        one_hot_labels(labels.reshape(2, 2), 10)
