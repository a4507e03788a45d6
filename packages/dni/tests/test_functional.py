"""The maths module: loss gradient, BP(λ) mixing, context broadcasting."""

import pytest
import torch

from altgrad.dni._functional import broadcast_context, cosine_similarity, mix_gradient, sg_loss, sg_loss_grad


def test_sg_loss_grad_is_the_gradient_of_sg_loss():
    torch.manual_seed(0)
    pred = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 3, dtype=torch.float64)
    loss = ((pred - target) ** 2).sum() / 5
    (expected,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(sg_loss_grad(pred, target, 5), expected)
    torch.testing.assert_close(sg_loss(pred, target, 5).double(), loss.detach())


def test_mix_gradient_endpoints_and_middle():
    g, s = torch.randn(4), torch.randn(4)
    assert mix_gradient(g, s, 1.0, 0.5) is g  # backprop: bit-identical
    torch.testing.assert_close(mix_gradient(None, s, 0.0, 0.5), 0.5 * s)
    torch.testing.assert_close(mix_gradient(g, s, 0.25, 2.0), 0.25 * g + 0.75 * 2.0 * s)


def test_cosine_similarity_handles_zero():
    # exact: zero by construction (torch.where's 0 branch)
    assert float(cosine_similarity(torch.zeros(3), torch.ones(3))) == 0.0
    assert float(cosine_similarity(torch.ones(3), 2 * torch.ones(3))) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("shape", "batch_dim", "feature_dim", "expected"),
    [
        ((2, 5), 0, -1, (2, 3)),
        ((2, 4, 5), 0, -1, (2, 4, 3)),
        ((2, 6, 4, 4), 0, 1, (2, 3, 4, 4)),
        ((7, 2, 5), 1, -1, (7, 2, 3)),
    ],
)
def test_broadcast_context_shapes_and_values(shape, batch_dim, feature_dim, expected):
    ctx = torch.arange(6.0).reshape(2, 3)
    out = broadcast_context(ctx, torch.zeros(shape), batch_dim, feature_dim)
    assert tuple(out.shape) == expected
    fdim = feature_dim % len(shape)
    bdim = batch_dim if batch_dim < fdim else batch_dim - 1
    for j in range(3):
        rows = out.select(fdim, j).movedim(bdim, 0).reshape(2, -1)
        for b in range(2):
            assert torch.all(rows[b] == ctx[b, j])  # exact: a broadcast copies the values
