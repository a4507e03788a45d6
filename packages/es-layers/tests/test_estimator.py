"""Statistical checks of the ES gradient estimate through the batched forward (fixed seeds, stated tolerances).

For a fitness linear in the parameters, f(θ) = v · layer_θ(x), antithetic weights
w_k = (f(θ+E_k) - f(θ-E_k)) / (2 N σ²) give E[Σ_k w_k E_k] = ∂f/∂W for every noise law whose entries are
uncorrelated with variance σ² (IID, sparse, permuted, sign flip, low rank). Averaged over T steps × N members.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import altgrad.es_layers as es

N, T, T_SHARED, SIGMA = 128, 40, 160, 0.1
SHARED = {"permuted", "permuted-sparse", "flipout", "conv-flipout", "conv-permuted"}

FACTORIES = {
    "iid": lambda: es.PerturbedLinear(6, 4, N, seed=0, dtype=torch.float64),
    "sparse": lambda: es.SparsePerturbedLinear(6, 4, N, sparsity=2, seed=0, dtype=torch.float64),
    "permuted": lambda: es.PermutedLinear(6, 4, N, permutation="in", seed=0, dtype=torch.float64),
    "permuted-sparse": lambda: es.PermutedLinear(
        6, 4, N, in_sparsity=3, out_sparsity=2, seed=0, dtype=torch.float64
    ),
    "flipout": lambda: es.FlipoutLinear(6, 4, N, flip="both", seed=0, dtype=torch.float64),
    "lowrank": lambda: es.LowRankLinear(6, 4, N, rank=2, seed=0, dtype=torch.float64),
    "conv-lowrank": lambda: es.LowRankConv2d(2, 3, 2, N, seed=0, dtype=torch.float64),
    "conv-flipout": lambda: es.FlipoutConv2d(2, 3, 2, N, flip="both", seed=0, dtype=torch.float64),
    "conv-permuted": lambda: es.PermutedConv2d(2, 3, 2, N, permutation="out", seed=0, dtype=torch.float64),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_antithetic_estimate_is_unbiased(name):
    torch.manual_seed(0)  # parameter initialisation
    layer = FACTORIES[name]()
    g = torch.Generator().manual_seed(1)
    conv = isinstance(layer, torch.nn.Conv2d)
    x1 = torch.randn(1, *((2, 3, 3) if conv else (6,)), generator=g, dtype=torch.float64)
    with torch.no_grad():
        v = torch.randn(layer(x1).shape, generator=g, dtype=torch.float64)
    # true gradient of f(W, b) = v · layer(x1)
    w_param = layer.weight.detach().clone().requires_grad_(True)
    b_param = layer.bias.detach().clone().requires_grad_(True)
    y = F.conv2d(x1, w_param, b_param) if conv else F.linear(x1, w_param, b_param)
    (y * v).sum().backward()
    x = x1.expand(2 * N, *x1.shape[1:])
    est_w = torch.zeros_like(layer.weight)
    est_b = torch.zeros_like(layer.bias)
    layer.perturbed_flag = True
    steps = T_SHARED if name in SHARED else T
    for _ in range(steps):
        layer.set_noise(SIGMA)
        with torch.no_grad():
            f = (layer(x) * v).flatten(1).sum(1)
        weights = es.antithetic_difference(f) / (2 * N * SIGMA**2)
        gw, gb = layer.es_grad(weights)
        est_w += gw / steps
        est_b += gb / steps
    rel_w = (est_w - w_param.grad).norm() / w_param.grad.norm()
    rel_b = (est_b - b_param.grad).norm() / b_param.grad.norm()
    # Per-member noise: relative error ~ sqrt(d / (N T)) ≈ 0.07 (d = 24 weights). Shared noise (one E per step):
    # the c_ij E_ij² / σ² term only averages over the steps: relative error ~ sqrt(2 / T_SHARED) ≈ 0.11.
    shared = name in SHARED
    assert rel_w < (0.3 if shared else 0.2), rel_w
    assert rel_b < 0.3, rel_b  # bias noise is per member in every mode (weight noise adds variance)
    cos = F.cosine_similarity(est_w.flatten(), w_param.grad.flatten(), dim=0)
    assert cos > (0.95 if shared else 0.97), cos
