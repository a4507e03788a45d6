"""Differential, property-based tests: every layer type against a slow, obvious per-member reference.

The reference evaluates row ``i`` (member ``k = i % n``, repeat ``r = i // n``) with the explicit perturbed weights
``W + c_r E_k`` in float64, where ``E_k`` is built densely, in float64, from the layer's own noise pieces. Hypothesis
draws shapes, modes, antithetic on/off, input views (transposed, expanded, flipped, sliced, negated, channels-last),
dtypes, NaN/inf in the input and in the fitness, and 1 or 2 threads.

**Error bound** (the tolerance of every comparison). Each output entry is a sum of at most ``L`` products computed
in the layer's dtype (unit roundoff ``u``): the base ``x Wᵀ + b`` (``K`` terms), the perturbation (at most ``K + r``
terms in a chain: ``(x b_k) a_kᵀ`` for low rank) and the final additions. By the standard bound for recursive or
blocked summation, ``|fl(y) - y| <= γ_L · (|x| (|W| + |E_k|)ᵀ + |b| + |ε_k|)`` with ``γ_L = L u / (1 - L u)`` and
``L = K + r + 4``, where ``|E_k|`` is the dense perturbation built from the absolute values of the noise pieces
(``|a_k| |b_k|ᵀ`` for low rank, which bounds every partial product). The reference's own float64 error is below
``2**-40`` of the same quantity and is covered by the factor 2 we allow on top.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import altgrad.es_layers as es

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# Torch < 2.6 has no float16 reflection_pad2d on CPU (added by pytorch/pytorch#135931): a float16 layer with
# padding_mode="reflect" raises torch's own `"reflection_pad2d" not implemented for 'Half'` there. The property test
# does not draw that combination on such torch, and its fixed-example test below is skipped.
HALF_REFLECT_PAD = _torch_version() >= (2, 6)


def _threads(k: int):
    class _Ctx:
        def __enter__(self):
            self.prev = torch.get_num_threads()
            torch.set_num_threads(k)

        def __exit__(self, *exc):
            torch.set_num_threads(self.prev)

    return _Ctx()


def _linear_layer(draw, dtype):
    k_in, m = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    n = draw(st.integers(1, 6))
    common = {"bias": draw(st.booleans()), "antithetic": draw(st.booleans()), "dtype": dtype, "seed": 7}
    mode = draw(st.sampled_from(["iid", "sparse", "permuted", "flipout", "lowrank"]))
    if mode == "iid":
        layer = es.PerturbedLinear(k_in, m, n, **common)
    elif mode == "sparse":
        layer = es.SparsePerturbedLinear(k_in, m, n, sparsity=draw(st.integers(1, k_in)), **common)
    elif mode == "permuted":
        layer = es.PermutedLinear(
            k_in,
            m,
            n,
            permutation=draw(st.sampled_from(["auto", "in", "out", "both"])),
            in_sparsity=draw(st.integers(0, k_in)),
            out_sparsity=draw(st.integers(0, m)),
            **common,
        )
    elif mode == "flipout":
        layer = es.FlipoutLinear(
            k_in, m, n, flip=draw(st.sampled_from(["auto", "in", "out", "both"])), **common
        )
    else:
        layer = es.LowRankLinear(k_in, m, n, rank=draw(st.integers(1, 3)), **common)
    return layer


def _conv_layer(draw, dtype):
    mode = draw(st.sampled_from(["iid", "permuted", "flipout", "lowrank"]))
    groups = draw(st.sampled_from([1, 2])) if mode in ("iid", "flipout") else 1
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    n = draw(st.integers(1, 4))
    padding_modes = ["zeros", "reflect", "circular"]
    if dtype == torch.float16 and not HALF_REFLECT_PAD:
        padding_modes.remove("reflect")
    common = {
        "stride": draw(st.sampled_from([1, 2])),
        "padding": draw(st.integers(0, 1)),
        "dilation": draw(st.sampled_from([1, 2])),
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(padding_modes)),
        "antithetic": draw(st.booleans()),
        "dtype": dtype,
        "seed": 11,
    }
    if mode == "iid":
        return es.PerturbedConv2d(c_in, c_out, kernel, n, **common)
    if mode == "permuted":
        return es.PermutedConv2d(
            c_in,
            c_out,
            kernel,
            n,
            permutation=draw(st.sampled_from(["auto", "in", "out", "both"])),
            in_sparsity=draw(st.integers(0, c_in)),
            out_sparsity=draw(st.integers(0, c_out)),
            **common,
        )
    if mode == "flipout":
        return es.FlipoutConv2d(
            c_in, c_out, kernel, n, flip=draw(st.sampled_from(["in", "out", "both"])), **common
        )
    return es.LowRankConv2d(c_in, c_out, kernel, n, rank=draw(st.integers(1, 2)), **common)


def _view(draw, base: torch.Tensor) -> torch.Tensor:
    """The same values as ``base`` through a strided / lazily negated view (or a flipped copy)."""
    kind = draw(
        st.sampled_from(["plain", "transposed", "expanded", "flipped", "sliced", "negated", "channels_last"])
    )
    if kind == "transposed":  # storage in the reverse dimension order
        return base.permute(*reversed(range(base.dim()))).contiguous().permute(*reversed(range(base.dim())))
    if kind == "expanded":  # stride 0 along the last dimension
        return base[..., :1].expand(base.shape)
    if kind == "flipped":
        return torch.flip(torch.flip(base, [0]), [0]) if base.dim() else base
    if kind == "sliced":  # every other element of a larger buffer
        big = torch.zeros(*base.shape[:-1], 2 * base.shape[-1], dtype=base.dtype)
        big[..., ::2] = base
        return big[..., ::2]
    if kind == "negated":  # neg bit: memory holds -x
        return torch._neg_view(-base)
    if kind == "channels_last" and base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    return base


def _poison(draw, x: torch.Tensor) -> torch.Tensor:
    if not draw(st.booleans()):
        return x
    x = x.clone()
    flat = x.view(-1)
    for _ in range(draw(st.integers(1, 2))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    return x


def _dense64(layer, abs_: bool = False):
    """Float64 ``E_k`` of all members from the layer's own noise pieces (``abs_``: built from |pieces|)."""
    noise = {
        k: (v.double().abs() if abs_ else v.double()) if v.is_floating_point() else v
        for k, v in layer._noise.items()
    }
    e = layer._dense_weight(noise)
    eps = noise.get("bias")
    return e, eps


def _reference(layer, x64: torch.Tensor):
    """Per-member loop in float64 with the explicit perturbed weights (and the abs-bound of each output)."""
    n = layer.members.numel()
    reps = x64.shape[0] // n
    e, eps = _dense64(layer)
    e_abs, eps_abs = _dense64(layer, abs_=True)
    w = layer.weight.detach().double()
    b = None if layer.bias is None else layer.bias.detach().double()
    is_linear = isinstance(layer, nn.Linear)
    xs_abs = torch.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0).abs()
    outs, bounds = [], []
    for i in range(x64.shape[0]):
        k = i % n
        c = -1.0 if layer.antithetic and reps > 1 and i // n >= reps // 2 else 1.0
        wk = w + c * e[k]
        bk = b if b is None or eps is None else b + c * eps[k]
        if bk is None and eps is not None:
            bk = c * eps[k]
        wa = w.abs() + e_abs[k]
        ba = (b.abs() if b is not None else 0) + (eps_abs[k] if eps_abs is not None else 0)
        ba = ba if isinstance(ba, torch.Tensor) else None
        xi, xa = x64[i : i + 1], xs_abs[i : i + 1]
        if is_linear:
            outs.append(F.linear(xi, wk, bk))
            bounds.append(F.linear(xa, wa, ba))
        else:
            pad = layer.padding
            if layer.padding_mode != "zeros":
                xi = F.pad(xi, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
                xa = F.pad(xa, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
                pad = 0
            outs.append(F.conv2d(xi, wk, bk, layer.stride, pad, layer.dilation, layer.groups))
            bounds.append(F.conv2d(xa, wa, ba, layer.stride, pad, layer.dilation, layer.groups))
    return torch.cat(outs), torch.cat(bounds)


def _check(layer, x):
    depth = layer.weight[0].numel() + getattr(layer, "rank", 1) + 4
    u = UNIT_ROUNDOFF[layer.weight.dtype]
    gamma = depth * u / (1 - depth * u)
    layer.perturbed_flag = True
    try:
        with torch.no_grad():
            got = layer(x)
    finally:
        layer.perturbed_flag = False
    ref, mag = _reference(layer, x.resolve_neg().double())
    assert got.dtype == layer.weight.dtype
    assert got.shape == ref.shape
    got64 = got.double()
    finite = torch.isfinite(ref)
    got_finite = torch.isfinite(got64)
    # non-finite input never turns into a finite output ...
    assert not (got_finite & ~finite).any()
    # ... and never leaks into other rows (members, examples). Within one image, torch's own bf16/fp16 CPU
    # convolution spreads a NaN to neighbouring outputs (F.conv2d alone does it), so that much is tolerated.
    leaked = (~got_finite & finite).reshape(x.shape[0], -1).any(1)
    if leaked.any():
        bad_rows = ~torch.isfinite(x.resolve_neg().double()).reshape(x.shape[0], -1).all(1)
        half_conv = isinstance(layer, nn.Conv2d) and layer.weight.dtype in (torch.bfloat16, torch.float16)
        assert half_conv, "a non-finite value leaked into finite outputs"
        assert not (leaked & ~bad_rows).any(), "a non-finite input leaked into another row"
    finite &= got_finite
    err = (got64 - ref).abs()[finite]
    allowed = 2 * gamma * mag[finite] + 1e-300
    assert (err <= allowed).all(), (err.max().item(), (err - allowed).max().item(), layer)


@SETTINGS
@given(data=st.data())
def test_linear_matches_per_member_reference(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    layer = _linear_layer(draw, dtype)
    n = layer.directions
    reps = draw(st.sampled_from([1, 2, 4] if layer.antithetic else [1, 2, 3]))
    middle = draw(st.sampled_from([(), (1,), (3,)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(reps * n, *middle, layer.in_features, generator=g).to(dtype)
    x = _view(draw, _poison(draw, x))
    layer.set_noise(draw(st.sampled_from([0.01, 0.5])))
    with _threads(draw(st.sampled_from([1, 2]))):
        _check(layer, x)


@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_conv_matches_per_member_reference(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    layer = _conv_layer(draw, dtype)
    n = layer.directions
    reps = draw(st.sampled_from([1, 2] if layer.antithetic else [1, 3]))
    eff = [layer.dilation[i] * (layer.kernel_size[i] - 1) + 1 for i in range(2)]  # the kernel's extent
    h, w = draw(st.integers(eff[0], eff[0] + 3)), draw(st.integers(eff[1], eff[1] + 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(reps * n, layer.in_channels, h, w, generator=g).to(dtype)
    x = _view(draw, _poison(draw, x))
    layer.set_noise(draw(st.sampled_from([0.01, 0.5])))
    with _threads(draw(st.sampled_from([1, 2]))):
        _check(layer, x)


@pytest.mark.skipif(
    not HALF_REFLECT_PAD, reason="torch < 2.6 has no float16 reflection_pad2d on CPU (pytorch/pytorch#135931)"
)
@pytest.mark.parametrize("cls", [es.PerturbedConv2d, es.PermutedConv2d, es.FlipoutConv2d, es.LowRankConv2d])
def test_conv_float16_reflect_matches_per_member_reference(cls):
    layer = cls(
        2, 3, (3, 2), 2, padding=1, padding_mode="reflect", antithetic=True, dtype=torch.float16, seed=11
    )
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * 2, 2, 5, 4, generator=g).to(torch.float16)
    layer.set_noise(0.5)
    _check(layer, x)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data())
def test_update_matches_explicit_sum_or_refuses_non_finite(data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    layer = _linear_layer(draw, dtype) if draw(st.booleans()) else _conv_layer(draw, dtype)
    n = layer.directions
    layer.set_noise(0.1)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    fitness = torch.randn(n, generator=g).to(
        draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    )
    shaping = draw(st.sampled_from([es.centered_ranks, es.z_score, lambda f: f]))
    poisoned = draw(st.booleans())
    if poisoned:
        fitness[draw(st.integers(0, n - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    if draw(st.booleans()):
        layer.free_memory()
    weights = shaping(fitness)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(layer.weight)
    with _threads(draw(st.sampled_from([1, 2]))):
        if poisoned:
            assert not torch.isfinite(weights).all()  # shaping never makes a finite weight from NaN/inf
            with pytest.raises(ValueError, match="finite"):
                layer.set_grad(weights)
            # exact: untouched (failed call)
            assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
            assert torch.equal(layer.weight.detach(), before)  # exact: untouched (failed call)
            return
        layer.set_grad(weights)
    layer._noise = layer._generate(layer.members)  # the dense reference needs every member's pieces
    e, _ = _dense64(layer)
    e_abs, _ = _dense64(layer, abs_=True)
    w64 = weights.to(dtype).double()  # the layer uses the weights rounded to its dtype
    ref = torch.einsum("k,k...->...", w64, e)
    mag = torch.einsum("k,k...->...", w64.abs(), e_abs)
    # the update sums at most N·r products plus an O(in·|kernel|) GEMM depth (permuted one-sided path)
    depth = n * getattr(layer, "rank", 1) + layer.weight[0].numel() + 4
    u = UNIT_ROUNDOFF[dtype]
    gamma = depth * u / (1 - depth * u)
    err = (layer.weight.grad.double() - ref).abs()
    assert (err <= 2 * gamma * mag + 1e-300).all(), (err.max().item(), layer)


@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_perturbed_linear_no_grad_strategies_match_reference(data):
    """`functional.perturbed_linear` without autograd, each strategy forced, against the float64 member loop.

    Strategies: a shared input (``x`` expanded over the rows, stride 0), ``W + cσE_k`` built in blocks (block size
    drawn down to one member), and ``x Wᵀ`` plus the per-member ``x E_kᵀ``. The shared strategy rounds the base
    ``x Wᵀ + b`` and then accumulates ``cσ x E_kᵀ`` onto it, a chain of at most ``2K + 3`` rounded operations, so
    the bound here uses ``L = 2K + 4`` (the blocked one rounds ``W + cσE_k`` once, then ``K`` products and the bias).
    """
    from unittest import mock

    import altgrad.es_layers.functional.iid as EF

    draw = data.draw
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    strategy = draw(st.sampled_from(["shared", "blocked", "split"]))
    k_in, m, n = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 6))
    antithetic = draw(st.booleans())
    reps = draw(st.sampled_from([1, 2, 4] if antithetic else [1, 2, 3]))
    middle = draw(st.sampled_from([(), (1,), (3,)]))
    sigma = draw(st.sampled_from([0.01, 0.5, -1.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn(m, k_in, generator=g).to(dtype)
    bias = torch.randn(m, generator=g).to(dtype) if draw(st.booleans()) else None
    noise_w = _poison(draw, torch.randn(n, m, k_in, generator=g).to(dtype))
    noise_b = torch.randn(n, m, generator=g).to(dtype) if draw(st.booleans()) else None
    if strategy == "shared":
        x = _view(draw, _poison(draw, torch.randn(*middle, k_in, generator=g).to(dtype)))
        x = x.expand(reps * n, *middle, k_in)
    else:
        x = _view(draw, _poison(draw, torch.randn(reps * n, *middle, k_in, generator=g).to(dtype)))
    block_bytes = draw(st.sampled_from([1, 1 << 22]))
    with (
        mock.patch.object(EF, "_BLOCKED_MIN_ROWS", 0 if strategy == "blocked" else 1 << 30),
        mock.patch.object(EF, "_BLOCK_BYTES", block_bytes),
        _threads(draw(st.sampled_from([1, 2]))),
        torch.no_grad(),
    ):
        got = EF.perturbed_linear(x, weight, bias, noise_w, noise_b, sigma=sigma, antithetic=antithetic)

    x64 = x.resolve_neg().double().reshape(reps * n, -1, k_in)
    x_abs = torch.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0).abs()
    w64, e64 = weight.double(), noise_w.double()
    e_abs = torch.nan_to_num(e64, nan=0.0, posinf=0.0, neginf=0.0).abs()
    zero = torch.zeros(m, dtype=torch.float64)
    b64 = zero if bias is None else bias.double()
    eps64 = torch.zeros(n, m, dtype=torch.float64) if noise_b is None else noise_b.double()
    refs, mags = [], []
    for i in range(reps * n):
        k = i % n
        c = -sigma if antithetic and reps > 1 and i // n >= reps // 2 else sigma
        refs.append(F.linear(x64[i], w64 + c * e64[k], b64 + c * eps64[k]))
        mags.append(F.linear(x_abs[i], w64.abs() + abs(c) * e_abs[k], b64.abs() + abs(c) * eps64[k].abs()))
    ref = torch.stack(refs).reshape(*x.shape[:-1], m)
    mag = torch.stack(mags).reshape(*x.shape[:-1], m)
    assert got.shape == ref.shape
    assert got.dtype == dtype
    got64 = got.double()
    finite = torch.isfinite(ref)
    assert not (torch.isfinite(got64) & ~finite).any()  # non-finite inputs never give a finite output
    assert not (~torch.isfinite(got64) & finite).any()  # ... nor leak into finite ones (other members, rows)
    depth = 2 * k_in + 4
    u = UNIT_ROUNDOFF[dtype]
    allowed = 2 * depth * u / (1 - depth * u) * mag[finite] + 1e-300
    err = (got64 - ref).abs()[finite]
    assert (err <= allowed).all(), (err.max().item(), strategy, dtype)
