"""Shared fixtures: a factory of every perturbed layer type and an explicit per-member reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import altgrad.es_layers as es

# The test tensors are tiny: one thread avoids OpenMP barrier stalls when the CPU is shared with other jobs.
torch.set_num_threads(1)

N = 6  # population used by most layer tests
DT = torch.float64

LINEAR_CASES = {
    "iid": lambda: es.PerturbedLinear(5, 7, N, dtype=DT, seed=1),
    "iid-nobias": lambda: es.PerturbedLinear(5, 7, N, bias=False, dtype=DT, seed=1),
    "sparse1": lambda: es.SparsePerturbedLinear(5, 7, N, sparsity=1, dtype=DT, seed=2),
    "sparse2": lambda: es.SparsePerturbedLinear(5, 7, N, sparsity=2, dtype=DT, seed=2),
    "perm-in": lambda: es.PermutedLinear(5, 7, N, permutation="in", dtype=DT, seed=3),
    "perm-in-sparse": lambda: es.PermutedLinear(5, 7, N, in_sparsity=0.4, dtype=DT, seed=3),
    "perm-out": lambda: es.PermutedLinear(5, 7, N, permutation="out", dtype=DT, seed=3),
    "perm-out-sparse": lambda: es.PermutedLinear(5, 7, N, out_sparsity=3, bias=False, dtype=DT, seed=3),
    "perm-both": lambda: es.PermutedLinear(5, 7, N, permutation="both", in_sparsity=3, dtype=DT, seed=3),
    "flip-in": lambda: es.FlipoutLinear(5, 7, N, flip="in", dtype=DT, seed=4),
    "flip-out": lambda: es.FlipoutLinear(5, 7, N, flip="out", dtype=DT, seed=4),
    "flip-both": lambda: es.FlipoutLinear(5, 7, N, flip="both", bias=False, dtype=DT, seed=4),
    "lowrank1": lambda: es.LowRankLinear(5, 7, N, rank=1, dtype=DT, seed=5),
    "lowrank3": lambda: es.LowRankLinear(5, 7, N, rank=3, dtype=DT, seed=5),
}

CONV_CASES = {
    "conv-iid": lambda: es.PerturbedConv2d(4, 6, 3, N, padding=1, dtype=DT, seed=1),
    "conv-iid-groups-reflect": lambda: es.PerturbedConv2d(
        4, 6, 3, N, padding=1, groups=2, padding_mode="reflect", dtype=DT, seed=1
    ),
    "conv-perm-in": lambda: es.PermutedConv2d(4, 6, 3, N, permutation="in", in_sparsity=2, dtype=DT, seed=3),
    "conv-perm-out": lambda: es.PermutedConv2d(
        4, 6, 3, N, permutation="out", out_sparsity=0.5, dtype=DT, seed=3
    ),
    "conv-perm-both": lambda: es.PermutedConv2d(
        4, 6, (3, 1), N, permutation="both", stride=2, dtype=DT, seed=3
    ),
    "conv-flip-in": lambda: es.FlipoutConv2d(4, 6, 3, N, flip="in", dtype=DT, seed=4),
    "conv-flip-out": lambda: es.FlipoutConv2d(4, 6, 3, N, flip="out", bias=False, dtype=DT, seed=4),
    "conv-flip-both-groups": lambda: es.FlipoutConv2d(
        4, 6, 3, N, flip="both", groups=2, padding=1, padding_mode="circular", dtype=DT, seed=4
    ),
    "conv-lowrank1": lambda: es.LowRankConv2d(4, 6, 3, N, rank=1, dtype=DT, seed=5),
    "conv-lowrank2": lambda: es.LowRankConv2d(4, 6, 3, N, rank=2, dilation=2, padding=2, dtype=DT, seed=5),
}

AFFINE_CASES = {
    "affine": lambda: es.PerturbedAffine((4, 1, 1), N, dtype=DT, seed=6),
    "affine-vector": lambda: es.PerturbedAffine(5, N, dtype=DT, seed=6, options={"direct": True}),
}

ALL_CASES = {**LINEAR_CASES, **CONV_CASES, **AFFINE_CASES}


def make_input(layer: nn.Module, repeats: int, n: int = N, gen_seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(gen_seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(repeats * n, layer.in_features, generator=g, dtype=DT)
    if isinstance(layer, es.PerturbedAffine):
        shape = layer.normalized_shape
        return torch.randn(repeats * n, *shape[:1], *(3 for _ in shape[1:]), generator=g, dtype=DT)
    return torch.randn(repeats * n, layer.in_channels, 7, 6, generator=g, dtype=DT)


def reference_forward(layer, x: torch.Tensor, members=None) -> torch.Tensor:
    """Explicit loop: row i uses member members[i % n] with W + s E_k, b + s eps_k (s = -1 on antithetic repeats)."""
    members = list(range(layer.directions)) if members is None else list(members)
    n = len(members)
    dense_w, dense_b = layer.dense_noise()
    reps = x.shape[0] // n
    rows = []
    for i in range(x.shape[0]):
        k = members[i % n]
        r = i // n
        s = -1.0 if (layer.antithetic and reps > 1 and r >= reps // 2) else 1.0
        w = layer.weight + s * dense_w[k]
        b = None if layer.bias is None else layer.bias + s * dense_b[k]
        xi = x[i : i + 1]
        if isinstance(layer, nn.Linear):
            rows.append(F.linear(xi, w, b))
        elif isinstance(layer, es.PerturbedAffine):
            rows.append(xi * w + b)
        else:
            if layer.padding_mode != "zeros":
                xi = F.pad(xi, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
                pad = 0
            else:
                pad = layer.padding
            rows.append(F.conv2d(xi, w, b, layer.stride, pad, layer.dilation, layer.groups))
    return torch.cat(rows)


@pytest.fixture(params=sorted(ALL_CASES))
def case(request):
    return request.param, ALL_CASES[request.param]


@pytest.fixture(params=sorted(LINEAR_CASES))
def linear_case(request):
    return request.param, LINEAR_CASES[request.param]


@pytest.fixture
def make_x():
    return make_input


@pytest.fixture
def reference():
    return reference_forward
