"""IID ("perturbed") mode: dense per-member noise ``E_k`` (NESgpu's ``Perturbed``): Linear, Conv2d and
elementwise affine forwards, dense noise and the update."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _bmm_members,
    _check_no_overlap,
    _check_noise,
    _check_sigma,
    _conv_base,
    _linear_base,
    _linear_repeats,
    _linear_views,
    _repeat_signs,
    _repeats,
    _scale_,
    _Size2,
)

__all__ = [
    "perturbed_affine",
    "perturbed_conv2d",
    "perturbed_dense",
    "perturbed_linear",
    "perturbed_weighted_sum",
]

#: Bytes of perturbed weights ``W + c σ E_k`` built at once by the no-grad linear forward: a few members of every
#: sign, still in the cache when their GEMMs read them (4 MiB measured best on a 2-core Zen 4 with 1 MiB L2 per
#: core and 32 MiB L3; 2-8 MiB are within 5 %).
_BLOCK_BYTES = 1 << 22
#: Fewest rows per member and sign for which building ``W + c σ E_k`` pays (below it, ``x Wᵀ`` plus the per-member
#: ``x E_kᵀ`` reads each ``E_k`` once as a GEMM operand; measured crossover 8-16 rows for 64-512 features).
_BLOCKED_MIN_ROWS = 16


def perturbed_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    noise_w: Tensor,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Population forward of a Linear layer with dense per-member noise (NESgpu's ``PerturbedLinear``).

    Row ``i`` of the output is ``x_i (W + c σ E_k)ᵀ + b + c σ ε_k`` with ``k = i % n`` (see the module docstring).

    It computes ``x Wᵀ + b`` plus the per-member ``c σ (x E_kᵀ + ε_k)`` (differentiable), except when autograd is
    not needed (no input requires grad, or grad mode is off): then an input shared by every row (``x`` expanded
    from one ``(*, in_features)`` block, stride 0 over the rows) is multiplied once by ``W`` and once by all
    ``E_k``, and members with at least 16 rows per sign get ``W + c σ E_k`` built a few members at a time into a
    cache-sized buffer and one batched GEMM per block and sign (the FLOPs of one plain forward instead of two).

    Args:
        x: ``(R * n, *, in_features)``, member index fastest.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        noise_w: ``(n, out_features, in_features)``: ``E_k``.
        noise_b: ``(n, out_features)``: ``ε_k``, or ``None``.
        sigma: Scale ``σ`` applied to the noise.
        antithetic: Negate the noise in the second half of an even number of repeats.
        out: Where to write the result (contiguous, ``(R * n, *, out_features)``, ``weight``'s dtype and device,
            not overlapping any input); only without autograd.

    Returns:
        ``(R * n, *, out_features)`` (``out`` when given).

    Raises:
        ValueError: For shapes that do not match, an odd number of repeats with ``antithetic``, a non-finite
            ``sigma``, or an unusable ``out``.
    """
    m, k = weight.shape
    n = noise_w.shape[0]
    _check_noise("noise_w", noise_w, (n, m, k))
    _check_noise("noise_b", noise_b, (n, m))
    sigma = _check_sigma(sigma)
    tensors = (x, weight, bias, noise_w, noise_b)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors):
        if out is not None:
            raise ValueError("out= is for evaluation without autograd; an input requires grad")
        result, x4, out4 = _linear_base(x, weight, bias, n, antithetic)
        out4 += _scale_(_bmm_members(x4, noise_w.transpose(1, 2), noise_b), antithetic, sigma)
        return result
    return _perturbed_linear_no_grad(x, weight, bias, noise_w, noise_b, sigma, antithetic, out)


def _perturbed_linear_no_grad(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    noise_w: Tensor,
    noise_b: Tensor | None,
    sigma: float,
    antithetic: bool,
    out: Tensor | None,
) -> Tensor:
    """`perturbed_linear` without autograd, into ``out``: the strategy is chosen from the layout (see there)."""
    m, k = weight.shape
    n = noise_w.shape[0]
    reps = _linear_repeats(x, k, n, antithetic)
    shape = (*x.shape[:-1], m)
    if out is None:
        out = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    elif (
        out.shape != shape
        or out.dtype != weight.dtype
        or out.device != weight.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous tensor of shape {shape}, dtype {weight.dtype} on {weight.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    _check_no_overlap(out, x=x, weight=weight, bias=bias, noise_w=noise_w, noise_b=noise_b)
    if out.numel() == 0:  # no rows, an empty middle dimension or out_features = 0
        return out
    x4, out4 = _linear_views(x, out, reps, n)
    signs = _repeat_signs(reps, antithetic, sigma)
    if x4.stride(0) == 0 and x4.stride(1) == 0:
        _shared_input_linear_(x4[0, 0], weight, bias, noise_w, noise_b, signs, out4)
    elif x4.shape[2] * reps // len(set(signs)) >= _BLOCKED_MIN_ROWS:
        _member_input_linear_(x4, weight, bias, noise_w, noise_b, signs, out4)
    else:
        rows = math.prod(x.shape[:-1])
        out2, x2 = out.view(rows, m), x4.reshape(rows, k)
        if bias is None:
            torch.mm(x2, weight.T, out=out2)
        else:
            torch.addmm(bias, x2, weight.T, out=out2)
        out4 += _scale_(_bmm_members(x4, noise_w.transpose(1, 2), noise_b), antithetic, sigma)
    return out


def _shared_input_linear_(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    noise_w: Tensor,
    noise_b: Tensor | None,
    signs: list[float],
    out4: Tensor,
) -> None:
    """``out4[r, k] = x (W + c_r E_k)ᵀ + b + c_r ε_k`` (``c_r`` = ``signs[r]``, σ folded in) for one ``x (T, in)``.

    ``x Wᵀ + b`` once and ``x E_kᵀ + ε_k`` for every member by one batched GEMM (``E`` is read once, whatever the
    number of repeats), then one pass per repeat.
    """
    n = noise_w.shape[0]
    shared = F.linear(x, weight, bias)
    # x E_kᵀ + ε_k goes to repeat 0's rows first (no other buffer); the other repeats are made from it
    first = out4[0]
    torch.bmm(x.expand(n, *x.shape), noise_w.transpose(1, 2), out=first)
    if noise_b is not None:
        first += noise_b.unsqueeze(1)
    for r in range(1, len(signs)):
        torch.add(shared, first, alpha=signs[r], out=out4[r])
    torch.add(shared, first, alpha=signs[0], out=first)


def _member_input_linear_(
    x4: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    noise_w: Tensor,
    noise_b: Tensor | None,
    signs: list[float],
    out4: Tensor,
) -> None:
    """``out4[r, k] = x4[r, k] (W + c_r E_k)ᵀ + b + c_r ε_k``: ``W + c E_k`` for a block of members and every sign
    built into a cache-sized buffer from one read of ``E``, then one ``baddbmm`` per block and repeat."""
    n = noise_w.shape[0]
    distinct = list(dict.fromkeys(signs))
    block = max(1, _BLOCK_BYTES // (len(distinct) * weight.numel() * weight.element_size()))
    perturbed = torch.empty(
        (len(distinct), min(block, n), *weight.shape), dtype=weight.dtype, device=weight.device
    )
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        for j, c in enumerate(distinct):
            w = perturbed[j, : stop - start]
            torch.add(weight, noise_w[start:stop], alpha=c, out=w)
            if noise_b is not None:
                b = (noise_b[start:stop] * c).unsqueeze(1)
                if bias is not None:
                    b += bias
            else:
                b = zero if bias is None else bias
            for r, c_r in enumerate(signs):
                if c_r == c:
                    torch.baddbmm(b, x4[r, start:stop], w.transpose(1, 2), out=out4[r, start:stop])


def perturbed_affine(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    noise_w: Tensor,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
) -> Tensor:
    """Population forward of an elementwise affine layer ``x ∘ W + b`` with dense per-member noise.

    Row ``i`` is ``x_i ∘ (W + c σ E_k) + b + c σ ε_k`` with ``k = i % n``; ``W`` (and ``b``) broadcast against the
    trailing dimensions of a row (NESgpu's ``PerturbedAffine``, for example ``(C, 1, 1)`` after a normalisation).

    Args:
        x: ``(R * n, *rest)``, member index fastest.
        weight: Shape ``S`` broadcastable to ``rest``.
        bias: Shape ``S`` or ``None``.
        noise_w: ``(n, *S)``.
        noise_b: ``(n, *S)`` or ``None``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.

    Returns:
        ``(R * n, *rest)`` (the broadcast shape).
    """
    n = noise_w.shape[0]
    _check_noise("noise_w", noise_w, (n, *weight.shape))
    _check_noise("noise_b", noise_b, (n, *weight.shape))
    sigma = _check_sigma(sigma)
    if not isinstance(x, Tensor) or x.dim() < 1 + weight.dim():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"x must have shape (repeats * n, ..., {', '.join(map(str, weight.shape))}), got {shape}"
        )
    reps = _repeats(x.shape[0], n, antithetic)
    out = x * weight if bias is None else torch.addcmul(bias, x, weight)
    x5 = x.reshape(reps, n, *x.shape[1:])
    pad = [1] * (x.dim() - 1 - weight.dim())
    e = noise_w.view(1, n, *pad, *weight.shape)
    p = x5 * e if noise_b is None else torch.addcmul(noise_b.view(1, n, *pad, *weight.shape), x5, e)
    out = out.contiguous()
    out.view(reps, n, *out.shape[1:]).add_(_scale_(p, antithetic, sigma))
    return out


def perturbed_dense(noise_w: Tensor, *, sigma: float = 1.0) -> Tensor:
    """Dense ``σ E_k`` of the IID mode: ``σ · noise_w`` (shape ``(n, *weight.shape)``).

    Args:
        noise_w: ``(n, *weight.shape)``.
        sigma: Scale ``σ``.

    Returns:
        ``(n, *weight.shape)``.
    """
    return noise_w * _check_sigma(sigma)


def perturbed_weighted_sum(w: Tensor, noise_w: Tensor, *, sigma: float = 1.0) -> Tensor:
    """``Σ_k w_k σ E_k`` of the IID mode.

    Args:
        w: ``(n,)`` weights.
        noise_w: ``(n, *weight.shape)``.
        sigma: Scale ``σ``.

    Returns:
        Tensor of the weight's shape.
    """
    _check_noise("w", w, (noise_w.shape[0],))
    g = (w @ noise_w.reshape(noise_w.shape[0], -1)).view(noise_w.shape[1:])
    return _scale_(g, False, _check_sigma(sigma))


def perturbed_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    noise_w: Tensor,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
    stride: _Size2 = 1,
    padding: _Size2 | str = 0,
    dilation: _Size2 = 1,
    groups: int = 1,
) -> Tensor:
    """Population forward of a Conv2d layer with dense per-member filters (NESgpu's ``PerturbedConv2d``).

    One grouped convolution with ``groups = n · groups`` over the input viewed as ``(R, n·C_in, H, W)``.
    ``stride``, ``padding`` (zero padding; pad the input first for other modes), ``dilation`` and ``groups`` are
    those of ``F.conv2d``.

    Args:
        x: ``(R * n, C_in, H, W)``, member index fastest.
        weight: ``(C_out, C_in / groups, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        noise_w: ``(n, C_out, C_in / groups, kh, kw)``.
        noise_b: ``(n, C_out)`` or ``None``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        stride: As ``F.conv2d``.
        padding: As ``F.conv2d``.
        dilation: As ``F.conv2d``.
        groups: As ``F.conv2d``.

    Returns:
        ``(R * n, C_out, H_out, W_out)``.
    """
    n = noise_w.shape[0]
    _check_noise("noise_w", noise_w, (n, *weight.shape))
    _check_noise("noise_b", noise_b, (n, weight.shape[0]))
    sigma = _check_sigma(sigma)
    out, x5 = _conv_base(x, weight, bias, n, antithetic, stride, padding, dilation, groups)
    reps, c = x5.shape[0], x5.shape[2]
    bias_flat = noise_b.reshape(-1) if noise_b is not None else None
    xv = x5.reshape(reps, n * c, *x5.shape[3:])
    p = F.conv2d(
        xv, noise_w.reshape(-1, *noise_w.shape[2:]), bias_flat, stride, padding, dilation, groups * n
    )
    out.view(reps, n, *out.shape[1:]).add_(_scale_(p.view(reps, n, *out.shape[1:]), antithetic, sigma))
    return out
