"""The seed README's usage examples run with only the import changed.

Original (cydonia999, a fork of PyTorch 0.4)::

    import torch.optim as optim
    from torch.optim.sign_internal_decay import LinearInternalDecay, CosineInternalDecay, RestartCosineInternalDecay
"""

import pytest
import torch

import altgrad.sign_optim as optim
from altgrad.sign_optim.sign_internal_decay import (
    CosineInternalDecay,
    LinearInternalDecay,
    RestartCosineInternalDecay,
)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _train(net, optimizer, steps=100):
    torch.manual_seed(1)
    x = torch.randn(64, 8)
    y = x.sum(dim=1, keepdim=True).sin()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_without_internal_decay():
    net = _net()
    optimizer = optim.AddSign(net.parameters(), lr=0.001)
    losses = _train(net, optimizer)
    assert losses[-1] < losses[0]
    net = _net()
    optimizer = optim.PowerSign(net.parameters(), lr=0.001)
    losses = _train(net, optimizer)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("which", ["linear", "cosine", "restart", "custom"])
@pytest.mark.parametrize("name", ["AddSign", "PowerSign"])
def test_with_internal_decay(name, which):
    T_max = 100  # the total number of training steps. Note that this is not epoch number.
    if which == "linear":
        decay = LinearInternalDecay(T_max)  # linear deacy
    elif which == "cosine":
        decay = CosineInternalDecay(T_max)  # cyclical decay
    elif which == "restart":
        decay = RestartCosineInternalDecay(T_max)  # restart decay
    else:
        decay = lambda x: 2 - x / float(T_max)  # noqa: E731  (custom decay, as in the README)

    net = _net()
    optimizer = getattr(optim, name)(net.parameters(), lr=0.001, sign_internal_decay=decay)
    losses = _train(net, optimizer, steps=T_max)
    assert losses[-1] < losses[0]


def test_readme_parameter_defaults():
    net = _net()
    for cls, alpha in ((optim.AddSign, 1.0), (optim.PowerSign, 2.718281828459045)):
        defaults = cls(net.parameters()).defaults
        assert defaults["lr"] == 1e-3  # exact: a stored default, not computed
        assert defaults["beta"] == 0.9  # exact: a stored default, not computed
        assert defaults["alpha"] == pytest.approx(alpha)
        assert defaults["sign_internal_decay"] is None
    assert CosineInternalDecay(10).num_periods == 0.5  # exact: a stored default, not computed
    assert RestartCosineInternalDecay(10).num_periods == 1
    assert CosineInternalDecay(10).zero_after is None
