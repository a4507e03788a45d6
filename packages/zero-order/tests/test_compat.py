"""The TorchOpt-shaped namespace: functional adam matches torch.optim.Adam; apply_updates semantics."""

import pytest
import torch

import altgrad.zero_order.compat as torchopt


def test_functional_adam_matches_torch_adam():
    g = torch.Generator().manual_seed(0)
    params = (torch.randn(3, 2, generator=g), torch.randn(2, generator=g))
    ref = [p.clone().requires_grad_() for p in params]
    opt_ref = torch.optim.Adam(ref, lr=0.05)
    opt = torchopt.adam(lr=0.05)
    state = opt.init(params)
    for _ in range(5):
        grads = tuple(torch.randn(p.shape, generator=g) for p in params)
        updates, state = opt.update(grads, state)
        params = torchopt.apply_updates(params, updates)
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt_ref.step()
    # Same formula, different operation order: each of the 5 steps rounds |p| and the update (|m̂/(√v̂+ε)| ≤
    # 1/√(1−β2) ≈ 31.7 for β1 = 0.9 < √β2) a few times, ≤ 4u each: |Δ| ≤ 5 · 4u · (max_t |p_t| + lr · 31.7), and
    # max_t |p_t| ≤ |p_5| + 5 · lr · 31.7.
    u, step_max = 2.0**-24, 0.05 * 31.7
    for p, r in zip(params, ref):
        tol = 5 * 4 * u * (r.detach().abs().max().item() + 5 * step_max + step_max)
        torch.testing.assert_close(p, r.detach(), rtol=0, atol=tol)


def test_apply_updates_inplace_and_not():
    p = (torch.zeros(2),)
    out = torchopt.apply_updates(p, (torch.ones(2),), inplace=False)
    assert p[0].sum() == 0  # exact: integer-valued
    assert out[0].sum() == 2  # exact: integer-valued
    out = torchopt.apply_updates(p, (torch.ones(2),))
    assert out[0] is p[0]
    assert p[0].sum() == 2  # exact: integer-valued


def test_adam_validation():
    with pytest.raises(ValueError):
        torchopt.adam(lr=-1)
    with pytest.raises(ValueError):
        torchopt.adam(betas=(1.0, 0.9))


def test_Adam_is_torch_adam():
    assert torchopt.Adam is torch.optim.Adam
