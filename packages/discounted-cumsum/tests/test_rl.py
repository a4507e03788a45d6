"""RL helpers against plain Python loops written the way RL libraries write them."""

from __future__ import annotations

import pytest
import torch

from altgrad.discounted_cumsum import discounted_returns, generalized_advantage_estimate


def returns_loop(rewards, gamma, dones, bootstrap):
    """Time-major [T, B] loop: R_t = r_t + gamma * (1 - d_t) * R_{t+1}."""
    T = rewards.shape[0]
    out = torch.zeros_like(rewards)
    nxt = bootstrap.clone()
    for t in reversed(range(T)):
        nxt = rewards[t] + gamma * (1.0 - dones[t]) * nxt
        out[t] = nxt
    return out


def gae_loop(rewards, values, gamma, lam, dones, bootstrap):
    """CleanRL's loop, with dones[t] meaning the episode ended after step t."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(bootstrap)
    for t in reversed(range(T)):
        next_value = bootstrap if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv


@pytest.mark.parametrize(("T", "B"), [(128, 8), (37, 5), (1, 3)])
def test_discounted_returns_time_major(T, B):
    r = torch.randn(T, B, dtype=torch.float64)
    d = (torch.rand(T, B) < 0.1).double()
    boot = torch.randn(B, dtype=torch.float64)
    got = discounted_returns(r, 0.97, dones=d.bool(), bootstrap=boot, dim=0)
    torch.testing.assert_close(got, returns_loop(r, 0.97, d, boot))


def test_discounted_returns_batch_major_matches_time_major():
    r = torch.randn(6, 50)
    d = torch.rand(6, 50) < 0.1
    a = discounted_returns(r, 0.9, dones=d, bootstrap=torch.ones(6))
    b = discounted_returns(r.T, 0.9, dones=d.T, bootstrap=torch.ones(6), dim=0).T
    torch.testing.assert_close(a, b)


def test_discounted_returns_without_dones_or_bootstrap():
    r = torch.ones(4)
    torch.testing.assert_close(discounted_returns(r, 0.5), torch.tensor([1.875, 1.75, 1.5, 1.0]))


@pytest.mark.parametrize(("T", "B"), [(128, 8), (64, 3), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gae_matches_loop(T, B, dtype):
    r = torch.randn(T, B, dtype=dtype)
    v = torch.randn(T, B, dtype=dtype)
    d = torch.rand(T, B) < 0.1
    boot = torch.randn(B, dtype=dtype)
    got = generalized_advantage_estimate(r, v, 0.99, 0.95, dones=d, bootstrap=boot, dim=0)
    want = gae_loop(r.double(), v.double(), 0.99, 0.95, d.double(), boot.double())
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_gae_batch_major_and_tensor_gamma():
    r, v = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
    d = torch.rand(4, 30) < 0.1
    gamma = torch.tensor([0.9, 0.95, 0.99, 1.0], dtype=torch.float64)
    got = generalized_advantage_estimate(r, v, gamma, 0.9, dones=d)
    for i in range(4):
        want = gae_loop(
            r[i], v[i], gamma[i].item(), 0.9, d[i].double(), torch.tensor(0.0, dtype=torch.float64)
        )
        torch.testing.assert_close(got[i], want)


def test_gae_lambda_one_gives_returns_minus_values():
    r, v = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    adv = generalized_advantage_estimate(r, v, 0.9, 1.0, bootstrap=2.0)
    torch.testing.assert_close(adv + v, discounted_returns(r, 0.9, bootstrap=2.0))


def test_returns_are_differentiable():
    r = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    boot = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: discounted_returns(a, 0.9, bootstrap=b), (r, boot))
