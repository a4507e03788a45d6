"""``import altgrad.dni.compat as dni``: koz4k/dni-pytorch's API, exercised the way its examples use it.

The four examples (mnist-mlp, mnist-cnn, mnist-full-unlock, rnn) are re-created here on small synthetic data
(no torchvision, no downloads) with the same model code and training loops, modernised only where torch 0.3
APIs are gone (``Variable``, ``loss.data[0]``, ``F.log_softmax`` without ``dim``).
"""

import io
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import altgrad.dni.compat as dni


def one_hot(indexes, n_classes):
    return F.one_hot(indexes, n_classes).float()


def blobs(n=256, dim=64, classes=10, seed=0):
    """Linearly separable-ish clusters: an MNIST stand-in."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def fit(model, x, y, steps=60, batch=64, lr=1e-3):
    """The examples' train(): one Adam over everything (synthesizers included), loss.backward(), step."""
    optimizer = optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        i = (torch.arange(batch) + step * batch) % len(x)
        optimizer.zero_grad()
        output = model(x[i], y[i])
        loss = F.nll_loss(output, y[i])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return losses, accuracy


# ---------------------------------------------------------------- examples/mnist-mlp
class MLP(nn.Module):
    def __init__(self, use_dni=True, context=False, dim=64, hidden=64):
        super().__init__()
        self.use_dni, self.context = use_dni, context
        self.hidden1 = nn.Linear(dim, hidden, bias=False)
        self.hidden1_bn = nn.BatchNorm1d(hidden)
        self.hidden2 = nn.Linear(hidden, hidden, bias=False)
        self.hidden2_bn = nn.BatchNorm1d(hidden)
        if use_dni:
            context_dim = 10 if context else None
            self.backward_interface = dni.BackwardInterface(
                dni.BasicSynthesizer(output_dim=hidden, n_hidden=1, context_dim=context_dim)
            )
        self.output = nn.Linear(hidden, 10, bias=False)
        self.output_bn = nn.BatchNorm1d(10)

    def forward(self, x, y=None):
        x = x.view(x.size()[0], -1)
        x = self.hidden1_bn(self.hidden1(x))
        x = self.hidden2_bn(self.hidden2(F.relu(x)))
        if self.use_dni and self.training:
            context = one_hot(y, 10) if self.context else None
            with dni.synthesizer_context(context):
                x = self.backward_interface(x)
        x = self.output_bn(self.output(F.relu(x)))
        return F.log_softmax(x, dim=1)


@pytest.mark.parametrize("context", [False, True])
def test_mnist_mlp_example_trains(context):
    torch.manual_seed(1)
    x, y = blobs()
    losses, accuracy = fit(MLP(context=context), x, y)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # loss falls
    assert accuracy > 0.9  # 10 separable clusters; chance is 0.1


# ---------------------------------------------------------------- examples/mnist-cnn
class ConvSynthesizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_trigger = nn.Conv2d(8, 8, kernel_size=5, padding=2)
        self.input_context = nn.Linear(10, 8)
        self.hidden = nn.Conv2d(8, 8, kernel_size=5, padding=2)
        self.output = nn.Conv2d(8, 8, kernel_size=5, padding=2)
        nn.init.constant_(self.output.weight, 0)  # zero-initialize the last layer, as in the paper

    def forward(self, trigger, context):
        x = self.input_trigger(trigger)
        if context is not None:
            x += self.input_context(context).unsqueeze(2).unsqueeze(3).expand_as(x)
        x = self.hidden(F.relu(x))
        return self.output(F.relu(x))


class CNN(nn.Module):
    def __init__(self, context=True):
        super().__init__()
        self.context = context
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3)
        self.conv1_bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, kernel_size=3)
        self.conv2_bn = nn.BatchNorm2d(8)
        self.backward_interface = dni.BackwardInterface(ConvSynthesizer())
        self.fc1 = nn.Linear(8 * 2 * 2, 32)
        self.fc1_bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)
        self.fc2_bn = nn.BatchNorm1d(10)

    def forward(self, x, y=None):
        x = F.relu(F.max_pool2d(self.conv1_bn(self.conv1(x)), 2))  # 1x14x14 -> 4x6x6
        x = F.max_pool2d(self.conv2_bn(self.conv2(x)), 2)  # -> 8x2x2
        if self.training:
            context = one_hot(y, 10) if self.context else None
            with dni.synthesizer_context(context):
                x = self.backward_interface(x)
        x = F.relu(x).view(-1, 8 * 2 * 2)
        x = F.relu(self.fc1_bn(self.fc1(x)))
        return F.log_softmax(self.fc2_bn(self.fc2(x)), dim=1)


def test_mnist_cnn_example_trains():
    torch.manual_seed(1)
    x, y = blobs(dim=196)
    losses, accuracy = fit(CNN(), x.view(-1, 1, 14, 14), y, steps=80)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert accuracy > 0.9


# ---------------------------------------------------------------- examples/mnist-full-unlock
class FullUnlock(nn.Module):
    def __init__(self, context=True, dim=64, hidden=64):
        super().__init__()
        self.context = context
        self.hidden1 = nn.Linear(dim, hidden, bias=False)
        self.hidden1_bn = nn.BatchNorm1d(hidden)
        self.hidden2 = nn.Linear(hidden, hidden, bias=False)
        self.hidden2_bn = nn.BatchNorm1d(hidden)
        context_dim = 10 if context else None
        self.bidirectional_interface = dni.BidirectionalInterface(
            dni.BasicSynthesizer(output_dim=hidden, n_hidden=2, trigger_dim=dim, context_dim=context_dim),
            dni.BasicSynthesizer(output_dim=hidden, n_hidden=2, context_dim=context_dim),
        )
        self.output = nn.Linear(hidden, 10, bias=False)
        self.output_bn = nn.BatchNorm1d(10)

    def forward(self, x, y=None):
        input_flat = x.view(x.size()[0], -1)
        x = self.hidden1_bn(self.hidden1(input_flat))
        x = self.hidden2_bn(self.hidden2(F.relu(x)))
        if self.training:
            context = one_hot(y, 10) if self.context else None
            with dni.synthesizer_context(context):
                x = self.bidirectional_interface(x, input_flat)
        x = self.output_bn(self.output(F.relu(x)))
        return F.log_softmax(x, dim=1)


def test_mnist_full_unlock_example_trains():
    torch.manual_seed(1)
    x, y = blobs()
    losses, accuracy = fit(FullUnlock(), x, y, steps=120)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert accuracy > 0.9


# ---------------------------------------------------------------- examples/rnn
class RNNModel(nn.Module):
    def __init__(self, ntoken=12, ninp=16, nhid=24, nlayers=2, use_dni=True):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        self.backward_interface = (
            dni.BackwardInterface(dni.BasicSynthesizer(2 * nhid, n_hidden=2)) if use_dni else None
        )

    def join_hidden(self, hidden):
        return torch.cat(hidden, dim=2)

    def split_hidden(self, hidden):
        h, c = hidden.chunk(2, dim=2)
        return h.contiguous(), c.contiguous()

    def forward(self, input, hidden):
        emb = self.encoder(input)
        if self.backward_interface is not None:
            hidden = self.split_hidden(self.backward_interface.make_trigger(self.join_hidden(hidden)))
        output, hidden = self.rnn(emb, hidden)
        if self.backward_interface is not None:
            hidden = self.join_hidden(hidden)
            self.backward_interface.backward(hidden, factor=0.1)  # scale as in the paper
            hidden = self.split_hidden(hidden)
        decoded = self.decoder(output.view(output.size(0) * output.size(1), output.size(2)))
        return decoded.view(output.size(0), output.size(1), decoded.size(1)), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (
            weight.new_zeros(self.nlayers, bsz, self.nhid),
            weight.new_zeros(self.nlayers, bsz, self.nhid),
        )


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def test_rnn_example_trains_and_saves():
    torch.manual_seed(1111)
    ntokens, bptt, batch_size = 12, 5, 8
    stream = torch.arange(400) % ntokens  # a cyclic "corpus": the next token is predictable
    train_data = stream.view(batch_size, -1).t().contiguous()
    model = RNNModel()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    hidden = model.init_hidden(batch_size)
    losses = []
    for _epoch in range(3):
        for i in range(0, train_data.size(0) - 1, bptt):
            seq_len = min(bptt, len(train_data) - 1 - i)
            data, targets = train_data[i : i + seq_len], train_data[i + 1 : i + 1 + seq_len].reshape(-1)
            hidden = repackage_hidden(hidden)
            optimizer.zero_grad()
            with dni.defer_backward():
                output, hidden = model(data, hidden)
                loss = criterion(output.view(-1, ntokens), targets)
                dni.backward(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) < 0.4 * sum(losses[:5])  # ln 12 = 2.48 at start
    buf = io.BytesIO()  # the example saves and reloads the whole model
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.eval()
    model.eval()
    h = model.init_hidden(2)
    x = train_data[:5, :2]
    assert torch.equal(loaded(x, h)[0], model(x, h)[0])  # exact: same route (a reloaded copy of the model)


# ---------------------------------------------------------------- semantics, with values
def linear_synth(dim, seed=0):
    torch.manual_seed(seed)
    s = dni.BasicSynthesizer(dim)  # n_hidden=0: one Linear, zero-initialised
    with torch.no_grad():
        s.input_trigger.weight.normal_()
        s.input_trigger.bias.normal_()
    return s


def test_backward_interface_values():
    """forward(h): the block below gets ŝ = M(h) now; the synthesizer gets 2(ŝ − g)/B from the true gradient."""
    torch.manual_seed(0)
    lower, upper = nn.Linear(3, 4), nn.Linear(4, 2)
    iface = dni.BackwardInterface(linear_synth(4))
    x = torch.randn(5, 3)
    h = lower(x)
    out = iface(h)
    s = h.detach() @ iface.synthesizer.input_trigger.weight.T + iface.synthesizer.input_trigger.bias
    torch.testing.assert_close(lower.weight.grad, s.T @ x, rtol=0, atol=1e-6)  # fp32 sums of 5 O(1) terms
    assert torch.equal(out, h)  # exact: identity by construction
    assert out.requires_grad
    assert out.grad_fn is not h.grad_fn
    upper(out).pow(2).sum().backward()
    g = 2 * upper(h.detach()) @ upper.weight  # true gradient at h
    d = 2 * (s - g) / 5
    torch.testing.assert_close(
        iface.synthesizer.input_trigger.weight.grad, d.T @ h.detach(), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(iface.synthesizer.input_trigger.bias.grad, d.sum(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(lower.weight.grad, s.T @ x, rtol=0, atol=1e-6)  # the true gradient stopped


def test_make_trigger_passes_the_true_gradient_on_and_backward_scales():
    iface = dni.BackwardInterface(linear_synth(4))
    h0 = torch.randn(3, 4, requires_grad=True)
    t = iface.make_trigger(h0)
    (t * torch.arange(4.0)).sum().backward()
    # exact: the true gradient passed on is 1·arange, exact in float
    assert torch.equal(h0.grad, torch.arange(4.0).expand(3, 4))
    h1 = torch.randn(3, 4, requires_grad=True)
    iface.backward(h1, factor=0.1)
    torch.testing.assert_close(h1.grad, 0.1 * iface.synthesizer(h1.detach(), None), rtol=1e-6, atol=0)


def test_stacked_interfaces_bootstrap():
    """The lower interface's target is the upper synthetic gradient back-propagated through the block."""
    torch.manual_seed(0)
    b1, b2 = nn.Linear(3, 4), nn.Linear(4, 4)
    i1, i2 = dni.BackwardInterface(linear_synth(4, 1)), dni.BackwardInterface(linear_synth(4, 2))
    x = torch.randn(6, 3)
    h1 = i1(b1(x))
    h2 = b2(h1)
    s2 = i2.synthesizer(h2.detach(), None).detach()
    s1 = i1.synthesizer(b1(x).detach(), None).detach()
    i2(h2)  # back-propagates s2 through b2 into i1's tap, which trains i1 on it
    d1 = 2 * (s1 - s2 @ b2.weight) / 6
    torch.testing.assert_close(i1.synthesizer.input_trigger.bias.grad, d1.sum(0), rtol=0, atol=1e-5)


def test_forward_interface_trains_on_the_message_and_returns_a_detached_synthesis():
    fwd = dni.ForwardInterface(linear_synth(4))
    message = torch.randn(5, 4, requires_grad=True)
    trigger = torch.randn(5, 4, requires_grad=True)
    out = fwd(message, trigger)
    W, b = fwd.synthesizer.input_trigger.weight, fwd.synthesizer.input_trigger.bias
    pred = trigger.detach() @ W.T + b
    torch.testing.assert_close(out, pred.detach())
    assert not out.requires_grad
    assert message.grad is None
    assert trigger.grad is None
    torch.testing.assert_close(b.grad, (2 * (pred - message) / 20).sum(0).detach(), rtol=0, atol=1e-6)
    fwd.eval()
    assert fwd(message, trigger) is message


def test_eval_mode_is_a_pass_through():
    h = torch.randn(2, 4, requires_grad=True)
    b = dni.BackwardInterface(linear_synth(4)).eval()
    assert b(h) is h
    assert b.make_trigger(h) is h
    b.backward(h)
    assert h.grad is None
    bi = dni.BidirectionalInterface(linear_synth(4), linear_synth(4)).eval()
    assert bi(h, torch.randn(2, 4)) is h


def test_defer_backward_runs_one_combined_backward():
    w = torch.randn(3, requires_grad=True)
    with dni.defer_backward():
        y = w * 2
        dni.backward(y, torch.ones(3))
        dni.backward((w * 3).sum())
        assert w.grad is None  # nothing ran yet
    assert torch.equal(w.grad, torch.full((3,), 5.0))  # exact: integer-valued (2 + 3)
    with pytest.raises(RuntimeError, match="nested"), dni.defer_backward(), dni.defer_backward():
        pass
    w.grad = None

    def failing_block():
        with dni.defer_backward():
            dni.backward((w * 3).sum())
            raise KeyError

    with pytest.raises(KeyError):
        failing_block()
    assert w.grad is None  # the block raised: nothing was back-propagated
    with pytest.raises(ValueError, match="shape"):
        dni.backward(w, torch.ones(2))


def test_synthesizer_context_nests_pops_on_error_and_is_per_thread():
    seen = []

    class Probe(nn.Module):
        def forward(self, trigger, context):
            seen.append(context)
            return torch.zeros_like(trigger)

    iface = dni.UnidirectionalInterface(Probe())
    t = torch.zeros(1, 2)
    with dni.synthesizer_context("a"):
        with dni.synthesizer_context("b"):
            iface.receive(t)
            thread = threading.Thread(target=iface.receive, args=(t,))
            thread.start()
            thread.join()
        iface.receive(t)
    with pytest.raises(KeyError), dni.synthesizer_context("c"):
        raise KeyError
    iface.receive(t)
    assert seen == ["b", None, "a", None]


def test_basic_synthesizer_shapes_zero_init_and_errors():
    s = dni.BasicSynthesizer(6, n_hidden=2, hidden_dim=5, trigger_dim=3, context_dim=4)
    out = s(torch.randn(7, 3), torch.randn(7, 4))
    assert out.shape == (7, 6)
    assert torch.count_nonzero(out) == 0
    assert [tuple(m.weight.shape) for m in s.layers] == [(5, 5), (6, 5)]
    with pytest.raises(ValueError, match="synthesizer_context"):
        s(torch.randn(7, 3))
    with pytest.raises(ValueError, match="n_hidden"):
        dni.BasicSynthesizer(4, n_hidden=-1)
    with pytest.raises(TypeError, match="synthesizer"):
        dni.BackwardInterface(lambda t, c: t)
    with pytest.raises(ValueError, match="no_grad"), torch.no_grad():
        dni.BackwardInterface(dni.BasicSynthesizer(2)).make_trigger(torch.zeros(1, 2))
