# TorchOpt's tutorial 6 "Zero-Order Differentiation" (tutorials/6_Zero_Order_Differentiation.ipynb), code cells
# verbatim except for the one import line: `import torchopt` -> `import altgrad.zero_order.compat as torchopt`.
# Run by tests/test_tutorial.py; also runnable as a script.
# ruff: noqa
import functorch
import torch
import torch.nn as nn
import torch.nn.functional as F

import altgrad.zero_order.compat as torchopt

torch.random.manual_seed(0)

fmodel, params = functorch.make_functional(nn.Linear(32, 1))
x = torch.randn(64, 32) * 0.1
y = torch.randn(64, 1) * 0.1
distribution = torch.distributions.Normal(loc=0, scale=1)


@torchopt.diff.zero_order(distribution=distribution, method="forward", argnums=0, num_samples=100, sigma=0.01)
def forward_process(params, fn, x, y):
    y_pred = fn(params, x)
    loss = F.mse_loss(y_pred, y)
    return loss


optimizer = torchopt.adam(lr=0.01)
opt_state = optimizer.init(params)  # init optimizer

for i in range(25):
    loss = forward_process(params, fmodel, x, y)  # compute loss

    grads = torch.autograd.grad(loss, params)  # compute gradients
    updates, opt_state = optimizer.update(grads, opt_state)  # get updates
    params = torchopt.apply_updates(params, updates)  # update network parameters

    print(f"{i + 1:03d}: {loss!r}")

torch.random.manual_seed(0)


class Net(torchopt.nn.ZeroOrderGradientModule, method="forward", num_samples=100, sigma=0.01):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, 1)
        self.distribution = torch.distributions.Normal(loc=0, scale=1)

    def forward(self, x, y):
        y_pred = self.fc(x)
        loss = F.mse_loss(y_pred, y)
        return loss

    def sample(self, sample_shape=()):
        return self.distribution.sample(sample_shape)


x = torch.randn(64, 32) * 0.1
y = torch.randn(64, 1) * 0.1
net = Net(dim=32)


optimizer = torchopt.Adam(net.parameters(), lr=0.01)

for i in range(25):
    loss = net(x, y)  # compute loss

    optimizer.zero_grad()
    loss.backward()  # backward pass
    optimizer.step()  # update network parameters

    print(f"{i + 1:03d}: {loss!r}")
