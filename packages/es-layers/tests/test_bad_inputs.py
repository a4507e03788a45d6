"""Unusable ``out=`` and empty dimensions: a clear ValueError or the empty result ``nn.Linear`` gives (issue 22 §5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import altgrad.es_layers as es
import altgrad.es_layers.functional as EF

N = 4
LINEARS = [
    (es.PerturbedLinear, {}),
    (es.SparsePerturbedLinear, {"sparsity": 1}),
    (es.PermutedLinear, {}),
    (es.FlipoutLinear, {}),
    (es.LowRankLinear, {"rank": 2}),
]


def _layer(cls, kwargs, fan_in, fan_out, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
        layer = cls(fan_in, fan_out, N, seed=0, noise_scale=0.1, **kwargs, **extra)
    layer.set_noise()
    layer.perturbed_flag = True
    return layer


def _square(gen):
    w = torch.randn(3, 3, generator=gen)
    return (
        w,
        torch.randn(3, generator=gen),
        torch.randn(N, 3, 3, generator=gen),
        torch.randn(N, 3, generator=gen),
    )


@pytest.mark.parametrize("alias", ["x", "weight", "bias", "noise_w", "noise_b"])
def test_perturbed_linear_refuses_out_overlapping_an_input(alias):
    gen = torch.Generator().manual_seed(0)
    weight, bias, noise_w, noise_b = _square(gen)
    x = torch.randn(2 * N, 3, generator=gen)
    args = {"x": x, "weight": weight, "bias": bias, "noise_w": noise_w, "noise_b": noise_b}
    # out (2N, 3) sharing memory with the named input
    buf = torch.randn(4 * N, 3, generator=gen)
    if alias == "x":
        out = x
    elif alias == "weight":
        args["weight"], out = buf[:3], buf[: 2 * N]
    elif alias == "bias":
        args["bias"], out = buf[0], buf[: 2 * N]
    elif alias == "noise_w":
        args["noise_w"], out = buf[: 3 * N].view(N, 3, 3), buf[N : 3 * N]
    else:
        args["noise_b"], out = buf[2 * N - 1 : 3 * N - 1], buf[: 2 * N]
    before = out.clone()
    with torch.no_grad(), pytest.raises(ValueError, match=f"out must not overlap the input '{alias}'"):
        EF.perturbed_linear(
            args["x"],
            args["weight"],
            args["bias"],
            args["noise_w"],
            args["noise_b"],
            antithetic=True,
            out=out,
        )
    assert torch.equal(out, before)  # exact: refused before anything was written


def test_perturbed_linear_accepts_disjoint_parts_of_one_buffer():
    gen = torch.Generator().manual_seed(1)
    weight, bias, noise_w, noise_b = _square(gen)
    buf = torch.randn(4 * N, 3, generator=gen)
    x, out = buf[: 2 * N], buf[2 * N :]
    with torch.no_grad():
        expected = EF.perturbed_linear(x, weight, bias, noise_w, noise_b, antithetic=True)
        got = EF.perturbed_linear(x, weight, bias, noise_w, noise_b, antithetic=True, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, expected)  # exact: the same no-grad route writes into out or a fresh tensor


@pytest.mark.parametrize(("cls", "kwargs"), LINEARS)
@pytest.mark.parametrize("shape", [(2 * N, 0, 3), (0, 3), (0, 2, 3)])
@pytest.mark.parametrize("grad", [False, True])
def test_linear_layers_return_empty_outputs_like_nn_linear(cls, kwargs, shape, grad):
    layer = _layer(cls, kwargs, 3, 5)
    x = torch.randn(*shape, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert y.shape == nn.Linear(3, 5)(x).shape == (*shape[:-1], 5)


@pytest.mark.parametrize(("cls", "kwargs"), [c for c in LINEARS if c[0] is not es.SparsePerturbedLinear])
@pytest.mark.parametrize("grad", [False, True])
def test_zero_in_features_gives_bias_plus_bias_noise(cls, kwargs, grad):
    layer = _layer(cls, kwargs, 0, 5)
    x = torch.randn(2 * N, 0, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    _, eps = layer.dense_noise()
    sign = torch.tensor([1.0] * N + [-1.0] * N, dtype=torch.float64)[:, None]  # antithetic repeats
    expected = layer.bias.double() + sign * eps.double().repeat(2, 1)
    # one float32 rounding of b + c ε (the empty products are exact zeros)
    torch.testing.assert_close(y.double(), expected.detach(), rtol=2**-23, atol=1e-30)
    layer.set_grad(torch.randn(N))
    assert layer.weight.grad.shape == (5, 0)


@pytest.mark.parametrize(("cls", "kwargs"), LINEARS)
def test_zero_out_features(cls, kwargs):
    layer = _layer(cls, kwargs, 3, 0)
    assert layer(torch.randn(2 * N, 3)).shape == (2 * N, 0)
    layer.set_grad(torch.randn(N))
    assert layer.weight.grad.shape == (0, 3)


def test_functional_linear_zero_rows_and_in_features():
    gen = torch.Generator().manual_seed(2)
    w, b = torch.randn(5, 3, generator=gen), torch.randn(5, generator=gen)
    e, eb = torch.randn(N, 5, 3, generator=gen), torch.randn(N, 5, generator=gen)
    with torch.no_grad():
        assert EF.perturbed_linear(torch.randn(0, 3), w, b, e, eb).shape == (0, 5)
        assert EF.perturbed_linear(torch.randn(N, 0, 3), w, b, e, eb).shape == (N, 0, 5)
        y = EF.perturbed_linear(torch.randn(N, 0), w[:, :0], b, e[:, :, :0], eb, sigma=0.5)
        y_nob = EF.perturbed_linear(torch.randn(N, 0), w[:, :0], None, e[:, :, :0], None)
    # b + σ ε_k: one float32 rounding each
    torch.testing.assert_close(y.double(), (b + 0.5 * eb).double(), rtol=2**-23, atol=1e-30)
    assert not y_nob.any()  # no bias, no bias noise, no input: zeros


@pytest.mark.parametrize("cls", [es.PerturbedConv2d, es.PermutedConv2d, es.FlipoutConv2d, es.LowRankConv2d])
def test_conv_layers_empty_batch_and_zero_input_channels(cls):
    layer = cls(3, 5, 3, N, padding=1, seed=0)
    layer.set_noise()
    layer.perturbed_flag = True
    assert (
        layer(torch.randn(0, 3, 6, 6)).shape == nn.Conv2d(3, 5, 3, padding=1)(torch.randn(0, 3, 6, 6)).shape
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        empty = cls(0, 5, 3, N, padding=1, seed=0)
    empty.set_noise()
    empty.perturbed_flag = True
    with pytest.raises(ValueError, match="at least one input channel"):
        empty(torch.randn(2 * N, 0, 6, 6))
