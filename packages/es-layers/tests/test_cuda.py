"""Every perturbation mode on CUDA against the CPU per-member loop (skipped without a GPU; issue 16).

The layers of ``conftest.ALL_CASES`` run on the GPU; the reference is the explicit per-member loop on the CPU in
float64, built from the GPU layer's own noise. ``ALTGRAD_ES_TEST_DEVICE=cpu`` runs the same checks on the CPU
(to check the checks where no GPU is available).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import altgrad.es_layers as es

DEVICE = os.environ.get("ALTGRAD_ES_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs CUDA (torch.cuda.is_available() is False)",
)
N = 6


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would round float32 GEMM/conv inputs to 10 mantissa bits; the float32 bound below assumes fp32."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _forward(layer, x):
    layer.perturbed_flag = True
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.perturbed_flag = False


def _cpu64(layer):
    """The GPU layer moved (in place) to the CPU in float64: same seed and step, stored noise converted exactly."""
    return layer.to("cpu", torch.float64)


@pytest.mark.parametrize("repeats", [1, 2])
def test_forward_and_update_match_cpu_loop_float64(case, repeats, make_x, reference):
    _, factory = case
    layer = factory().to(DEVICE)
    layer.set_noise(0.1)
    x = make_x(layer, repeats)
    got = _forward(layer, x.to(DEVICE)).cpu()
    w = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    layer.set_grad(w.to(DEVICE))
    g_w = layer.weight.grad.cpu()
    g_b = None if layer.bias is None else layer.bias.grad.cpu()
    layer.free_memory()
    layer.set_grad(w.to(DEVICE))  # regenerated on the GPU in chunks: the same noise
    # the same sums, but CUDA's index_add_ (sparse/permuted updates) adds in a racy order: float64 reorderings of
    # N = 6 terms of size <= ~1 differ by <= N·2**-53 ≈ 7e-16
    torch.testing.assert_close(layer.weight.grad.cpu(), g_w, rtol=1e-12, atol=1e-13)
    cpu = _cpu64(layer)
    cpu._noise = cpu._generate(cpu.members)  # the CPU's regeneration of the same (seed, step) noise
    # float64 sums of < 60 products of O(1) values in a different order: a few ulps (< 1e-13) apart
    torch.testing.assert_close(got, reference(cpu, x), rtol=1e-10, atol=1e-10)
    dense_w, dense_b = cpu.dense_noise()
    torch.testing.assert_close(g_w, torch.einsum("k,k...->...", w, dense_w), rtol=1e-10, atol=1e-12)
    if g_b is not None:
        torch.testing.assert_close(g_b, torch.einsum("k,k...->...", w, dense_b), rtol=1e-10, atol=1e-12)


def test_noise_same_on_gpu_and_cpu(case):
    # integer hashing is bit-identical; Box–Muller's log/cos/sin may differ by a few float64 ulps between devices
    _, factory = case
    gpu = factory().to(DEVICE)
    cpu = factory()
    gpu.set_noise(0.1)
    cpu.set_noise(0.1)
    for key, value in cpu._noise.items():
        other = gpu._noise[key].cpu()
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-12, atol=1e-14, msg=key)
        else:
            assert torch.equal(other, value), key  # exact: integer tensors (indices, signs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_forward_within_error_bound(case, make_x, dtype):
    _, factory = case
    layer = factory().to(DEVICE, dtype)
    layer.set_noise(0.1)
    x = make_x(layer, 2).to(DEVICE, dtype)
    got = _forward(layer, x).cpu().double()
    cpu = _cpu64(layer)  # the GPU layer's dtype-rounded weights and stored noise, exactly, in float64
    x64 = x.cpu().double()
    ref = _loop(cpu, x64)
    mag = _loop(cpu, x64, absolute=True)
    # |fl(y) - y| <= γ_L (|x|(|W| + |E_k|) + |b| + |ε_k|), L = fan-in + rank + 4 terms, u the unit roundoff
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
    depth = layer.weight[0].numel() + getattr(layer, "rank", 1) + 4
    gamma = depth * u / (1 - depth * u)
    assert ((got - ref).abs() <= 2 * gamma * mag).all()


def _loop(cpu, x64, absolute=False):
    noise = {k: ((v.abs() if absolute else v) if v.is_floating_point() else v) for k, v in cpu._noise.items()}
    e = cpu._dense_weight(noise)
    eps = noise.get("bias")
    w = cpu.weight.detach().abs() if absolute else cpu.weight.detach()
    b = None if cpu.bias is None else (cpu.bias.detach().abs() if absolute else cpu.bias.detach())
    x = x64.abs() if absolute else x64
    reps = x.shape[0] // N
    rows = []
    for i in range(x.shape[0]):
        k = i % N
        c = 1.0 if absolute or not (cpu.antithetic and reps > 1 and i // N >= reps // 2) else -1.0
        wk = w + c * e[k]
        bk = b if eps is None else (eps[k] * c if b is None else b + c * eps[k])
        xi = x[i : i + 1]
        if isinstance(cpu, nn.Linear):
            rows.append(torch.nn.functional.linear(xi, wk, bk))
        elif isinstance(cpu, es.PerturbedAffine):
            rows.append(xi * wk + bk)
        else:
            pad = cpu.padding
            if cpu.padding_mode != "zeros":
                xi = torch.nn.functional.pad(xi, cpu._reversed_padding_repeated_twice, mode=cpu.padding_mode)
                pad = 0
            rows.append(torch.nn.functional.conv2d(xi, wk, bk, cpu.stride, pad, cpu.dilation, cpu.groups))
    return torch.cat(rows)


@pytest.mark.parametrize("mode", ["iid", "sparse", "permuted", "flipout", "lowrank"])
def test_model_on_gpu_trains_like_on_cpu(mode):
    # the whole workflow (perturb, set_noise, population forward, set_grad, optimizer step) on the GPU gives the
    # CPU's parameters: same seed, same noise, float64
    def run(device):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double().to(device)
        pm = es.perturb(net, N, mode=mode, seed=3, noise_scale=0.1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x = torch.randn(2 * N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
        for _ in range(3):
            pm.set_noise()
            with torch.no_grad():
                loss = pm(x).pow(2).sum(1).view(2, N)
            opt.zero_grad()
            pm.set_grad(es.antithetic_difference(loss.flatten()))
            opt.step()
        return [p.detach().cpu() for p in net.parameters()]

    for a, b in zip(run(DEVICE), run("cpu")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
