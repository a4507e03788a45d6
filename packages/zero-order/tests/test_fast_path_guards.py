"""The module API's fast paths cannot be fooled (issue 21 §3): each case below gave a silent wrong result, an error
or kept memory on an earlier version; each is compared with the general path written out by hand (`_general`)."""

from __future__ import annotations

import functools
import sys
import threading
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _general import general_estimate, rounding_tolerance

import altgrad.zero_order as zo
from altgrad.zero_order import SeededNormal, ZeroOrderGradientModule, zero_order


class Base(ZeroOrderGradientModule, method="antithetic", num_samples=6, sigma=0.1, chunk_size=4):
    """A float64 module with seeded noise; subclasses build ``body`` and define ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.build()
        self.double()
        self.noise = SeededNormal(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss(x)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        return torch.randn(sample_shape)

    def zero_order_distribution(self) -> SeededNormal:
        return self.noise


def _check(net: ZeroOrderGradientModule, x: torch.Tensor, estimates: int = 2) -> None:
    """``estimates`` backward calls, each equal to the general path's estimate within the rounding bound."""
    params = [p for p in net.parameters() if p.requires_grad]
    for it in range(estimates):
        want = general_estimate(net, (x,))
        value = net(x)
        value.backward()
        tol = rounding_tolerance(net, value)
        for p, w in zip(params, want):
            torch.testing.assert_close(p.grad, w, rtol=0, atol=tol, msg=f"estimate {it}")
            p.grad = None
        with torch.no_grad():
            for p in params:
                p.mul_(0.9)


class Block(nn.Module):
    """Not an nn.Linear: the general path (functional_call) for its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 5) * 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.T)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_block_registered_under_two_names(batching):
    class Net(Base, batching=batching):
        def build(self):
            self.block = Block()
            self.again = self.block  # one module object, two names
            self.head = nn.Linear(5, 1)

        def loss(self, x):
            return self.head(self.again(self.block(x))).square().mean()

    net = Net()
    weight = net.block.weight
    _check(net, torch.randn(4, 5, dtype=torch.float64))
    assert net.block.weight is weight  # still the Parameter after two estimates
    assert net.again.weight is weight
    assert isinstance(weight, nn.Parameter)


def test_linear_called_with_keyword_input():
    class Net(Base):
        def build(self):
            self.fc = nn.Linear(5, 3)
            self.head = nn.Linear(3, 1)

        def loss(self, x):
            return self.head(input=torch.tanh(self.fc(input=x))).square().mean()

    _check(Net(), torch.randn(4, 5, dtype=torch.float64))


@pytest.mark.parametrize("patch", ["method", "partial"])
def test_instance_level_forward_is_run_and_kept(patch):
    def scaled(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # as an accelerate hook: wraps the forward
        return 3.0 * F.linear(x, layer.weight, layer.bias) + 1.0

    class Net(Base):
        def build(self):
            self.fc = nn.Linear(5, 2)
            if patch == "method":
                self.fc.forward = types.MethodType(scaled, self.fc)
            else:
                self.fc.forward = functools.partial(scaled, self.fc)

        def loss(self, x):
            return self.fc(x).square().mean()

    net = Net()
    x = torch.randn(4, 5, dtype=torch.float64)
    forward = net.fc.forward
    expected = scaled(net.fc, x).square().mean()
    assert torch.allclose(net(x), expected, rtol=1e-15, atol=0)  # same ops; one rounding apart at most
    _check(net, x)
    assert net.fc.__dict__["forward"] is forward  # the user's attribute is still there


@pytest.mark.parametrize("directions", ["dense", "lowrank", "flipout"])
@pytest.mark.parametrize("order", ["embedding-first", "head-first"])
def test_linear_weight_tied_to_an_embedding(directions, order):
    class Net(Base, directions=directions, rank=2):
        def build(self):
            if order == "head-first":  # the tied weight's name is the Linear's
                self.lm_head = nn.Linear(4, 7, bias=False)
            self.embed = nn.Embedding(7, 4)
            self.body = nn.Linear(4, 4)
            if order == "embedding-first":
                self.lm_head = nn.Linear(4, 7, bias=False)
                self.lm_head.weight = self.embed.weight  # LM weight tying
            else:
                self.embed.weight = self.lm_head.weight

        def loss(self, tokens):
            logits = self.lm_head(torch.tanh(self.body(self.embed(tokens))))
            return F.cross_entropy(logits.reshape(-1, 7), tokens.roll(1).reshape(-1))

    net = Net()
    tokens = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(2))
    _check(net, tokens)


def test_rnn_cell_keeps_memory_independent_of_length():
    class Net(Base, method="naive", num_samples=4):
        def build(self):
            self.cell = nn.Linear(8, 8)
            self.head = nn.Linear(8, 1)

        def loss(self, x):
            h = x
            for _ in range(self.steps):
                h = torch.tanh(self.cell(h))
            return self.head(h).square().mean()

    kept = {}
    for steps in (2, 20):
        net = Net()
        net.steps = steps
        x = torch.randn(16, 8, dtype=torch.float64)
        _check(net, x, estimates=1)
        workspace = net.__dict__["_zero_order_workspace"]
        kept[steps] = sum(b.numel() for b in workspace.scratch_buffers.values())
    assert kept[20] == kept[2]  # one output buffer per layer, however often it is called


def _noise(sample_shape: torch.Size) -> torch.Tensor:
    """A deterministic 'distribution' (zero mean, unit variance, not random): each estimate is a fixed function of
    the parameters and inputs, so two threads' results can be checked against one thread's."""
    n = max(1, torch.Size(sample_shape).numel())
    return (torch.arange(n, dtype=torch.float64).mul(2.399).cos() * 2**0.5).reshape(sample_shape)


def _run_threads(work, inputs, expected, rounds=40):
    wrong, errors = [], []

    def run(i):
        try:
            for _ in range(rounds):
                got = work(inputs[i])
                # exact: the same computation on the same inputs as the single-threaded run
                same = all(torch.equal(a, b) for a, b in zip(got, expected[i]))
                if not same:
                    wrong.append(i)
        except Exception as exc:
            errors.append(exc)

    old, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-6)  # switch threads often: interleave them inside every estimate
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(old)
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert not wrong


def test_two_threads_through_one_decorated_function():
    @zero_order(_noise, method="antithetic", num_samples=16, sigma=0.1, chunk_size=8)
    def loss(params, x):
        w1, w2 = params
        return torch.tanh(x @ w1.T).matmul(w2.T).square().mean()

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(32, 16), (1, 32)]]
    inputs = [torch.randn(8, 16, generator=g, dtype=torch.float64) * (1 + i) for i in range(2)]

    def work(
        x,
    ):  # each thread its own parameters (a race shows only when the threads' perturbed leaves differ)
        leaves = tuple((p * x.abs().sum() / 50).requires_grad_() for p in params)
        return torch.autograd.grad(loss(leaves, x), leaves)

    expected = [work(x) for x in inputs]
    _run_threads(work, inputs, expected)


def test_two_threads_through_one_module():
    class Net(ZeroOrderGradientModule, method="antithetic", num_samples=32, sigma=0.1, chunk_size=16):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 64).double()
            self.head = nn.Linear(64, 1).double()

        def forward(self, x):
            return self.head(torch.tanh(self.fc(x))).square().mean()

        def sample(self, sample_shape=torch.Size()):  # noqa: B008
            return _noise(sample_shape)

    net = Net()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(16, 32, generator=g, dtype=torch.float64) * (1 + i) for i in range(2)]

    def work(x):
        return torch.autograd.grad(net(x), list(net.parameters()))

    expected = [work(x) for x in inputs]
    _run_threads(work, inputs, expected)


def test_seeded_source_keeps_distinct_steps_across_threads():
    # zo.SeededNormal's counter is shared by the threads: every estimate still gets its own step.
    d = zo.SeededNormal(0)
    steps = []

    @zero_order(d, method="naive", num_samples=2, sigma=0.1)
    def loss(w):
        return w.square().sum()

    def run():
        for _ in range(20):
            w = torch.ones(3, requires_grad=True)
            loss(w).backward()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps.append(d.step)
    assert steps == [40]
