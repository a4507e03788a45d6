"""Zero-order estimates on CUDA against the same estimates on the CPU (skipped without a GPU; issue 16).

The seeded distributions are counter-based (``altgrad.es_layers.noise``): the noise of member ``k`` is a function of
``(seed, step, leaf, k)`` computed with integer hashing and a few float transcendental functions, so a CUDA run and a
CPU run of the same estimate draw the same directions up to the last bits of those functions. The estimates are
computed in float64, where those last bits are far below the tolerances (bounds beside each assertion).
``ALTGRAD_ZO_TEST_DEVICE=cpu`` runs the same checks on the CPU (to check the checks where no GPU is available).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from altgrad.zero_order import (
    SeededNormal,
    SeededRademacher,
    ZeroOrderGradientModule,
    estimate_gradient,
    zero_order,
)

DEVICE = os.environ.get("ALTGRAD_ZO_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs CUDA (torch.cuda.is_available() is False)",
)
METHODS = ["naive", "forward", "antithetic", "es", "ars"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would round float32 GEMM inputs to 10 mantissa bits; the float32 bound below assumes fp32."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _problem(device, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g, dtype=dtype)
    y = torch.randn(32, 3, generator=g, dtype=dtype)
    w = torch.randn(8, 3, generator=g, dtype=dtype) * 0.3
    b = torch.randn(3, generator=g, dtype=dtype) * 0.1
    x, y = x.to(device), y.to(device)

    def loss(w, b):
        return ((torch.tanh(x @ w + b) - y) ** 2).mean()

    return loss, [w.to(device), b.to(device)]


def test_seeded_noise_is_the_same_on_every_device():
    # float32 Box-Muller: the uniforms are exact (integer hashing), log/sqrt/cos are within a few ulps on either
    # device (CUDA: logf 1 ulp, sqrtf exact, cosf 2 ulp), so |Δz| <= ~6 ulp(|z|) + 2 ulp(1)·sqrt(-2 ln u_min)
    # <= 6·2^-24·5.7 + 2·2^-24·5.7 < 3e-6 for |z| <= 5.7 (the largest value 24-bit uniforms can produce).
    for dist in (SeededNormal(seed=3), SeededRademacher(seed=3)):
        cpu = dist.draw((7, 5), step=2, leaf=1, members=range(40), device="cpu", dtype=torch.float32)
        dev = dist.draw((7, 5), step=2, leaf=1, members=range(40), device=DEVICE, dtype=torch.float32)
        assert dev.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=3e-6)


@pytest.mark.parametrize("directions", ["dense", "lowrank", "flipout"])
@pytest.mark.parametrize("method", METHODS)
def test_estimate_matches_cpu(method, directions):
    # float64 throughout: the noise differs across devices by <= a few ulps of double (2e-16 relative), the loss by
    # <= n·u·Σ|terms| with n = 32·8 and u = 2^-53 (about 3e-14 relative), and the finite differences divide by σ = 0.05,
    # so each member's value differs by < 1e-11 relative; rtol 1e-8 leaves three orders of magnitude of slack.
    # Ranks (es, ars) only change if two members' values are within 1e-11 of each other, which the fixed seed avoids.
    results = []
    for device in ("cpu", DEVICE):
        loss, params = _problem(device)
        grads = estimate_gradient(
            loss,
            params,
            SeededNormal(seed=11),
            method=method,
            num_samples=24,
            sigma=0.05,
            directions=directions,
            top_k=8 if method == "ars" else None,
        )
        assert all(g.device.type == torch.device(device).type for g in grads)
        assert all(torch.isfinite(g).all() for g in grads)
        results.append([g.cpu() for g in grads])
    for cpu, dev in zip(*results):
        torch.testing.assert_close(dev, cpu, rtol=1e-8, atol=1e-12)


def test_decorator_on_device_matches_cpu_and_nan_stays_nan():
    # Same bound as test_estimate_matches_cpu (float64, σ = 0.1).
    grads = []
    for device in ("cpu", DEVICE):
        loss, params = _problem(device)
        params = [p.requires_grad_() for p in params]
        f = zero_order(SeededNormal(seed=4), method="antithetic", argnums=(0, 1), num_samples=16, sigma=0.1)(
            loss
        )
        f(*params).backward()
        grads.append([p.grad.cpu() for p in params])
    for cpu, dev in zip(*grads):
        torch.testing.assert_close(dev, cpu, rtol=1e-8, atol=1e-12)

    loss, params = _problem(DEVICE)
    nan_loss = lambda w, b: loss(w, b) * float("nan")  # noqa: E731
    est = estimate_gradient(nan_loss, params, SeededNormal(seed=4), method="es", num_samples=8, sigma=0.1)
    assert all(torch.isnan(g).all() for g in est)


class _Net(ZeroOrderGradientModule, method="antithetic", num_samples=16, sigma=0.05):
    def __init__(self, dist):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.dist = dist

    def forward(self, x, y):
        return ((self.net(x) - y) ** 2).mean()

    def sample(self, sample_shape=torch.Size()):  # noqa: B008
        return self.dist.sample(sample_shape)


def test_module_trains_on_device():
    # A few steps of SGD with the module API on the device: the loss must fall (an end-to-end check that every
    # piece of the module path runs on the device; the values are checked against the CPU above).
    torch.manual_seed(0)
    model = _Net(
        torch.distributions.Normal(torch.tensor(0.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))
    )
    model = model.to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g).to(DEVICE)
    y = torch.sin(x.sum(1, keepdim=True)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    first = model(x, y).item()
    for _ in range(100):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    last = model(x, y).item()
    assert all(p.grad.device.type == torch.device(DEVICE).type for p in model.parameters())
    assert last < 0.7 * first, (first, last)  # 0.45 with the CPU noise stream; the CUDA stream differs
