"""Low-rank mode (EGGROLL): ``E_k = a_k b_kᵀ`` of rank ``r``; the forward never forms ``E_k``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _add_conv_noise_,
    _check_noise,
    _check_sigma,
    _conv_base,
    _linear_base,
    _repeat_signs,
    _scale_,
    _Size2,
)

__all__ = ["lowrank_conv2d", "lowrank_dense", "lowrank_linear", "lowrank_weighted_sum"]


def _lowrank_checks(weight, a, b, noise_b):
    m = weight.shape[0]
    n = a.shape[0] if isinstance(a, Tensor) and a.dim() == 3 else None
    _check_noise("a", a, (n, m, None))
    n, _, r = a.shape  # checked: (n, m, r)
    _check_noise("b", b, (n, math.prod(weight.shape[1:]), r))
    _check_noise("noise_b", noise_b, (n, m))
    return n, r


#: Up to this many repeats the low-rank Linear accumulates in place repeat by repeat; more take one batched product.
_LOOP_REPEATS = 2


def lowrank_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
) -> Tensor:
    """Population forward of a Linear layer with rank-``r`` noise ``E_k = a_k b_kᵀ`` (EGGROLL).

    ``x_i E_kᵀ = (x_i b_k) a_kᵀ``: the extra work is ``O(r·(in + out))`` per row. The ``1/√r`` of a unit-variance
    low-rank perturbation is the caller's (the layers fold it into ``a``).

    Args:
        x: ``(R * n, *, in_features)``, member index fastest.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        a: ``(n, out_features, r)``.
        b: ``(n, in_features, r)``.
        noise_b: ``(n, out_features)`` or ``None``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.

    Returns:
        ``(R * n, *, out_features)``.
    """
    n, _ = _lowrank_checks(weight, a, b, noise_b)
    sigma = _check_sigma(sigma)
    out, x4, out4 = _linear_base(x, weight, bias, n, antithetic)
    a_t = a.transpose(1, 2)  # (n, r, m)
    rank = b.shape[2]
    if rank == 1 and b.stride(1) == 1:
        # the same elements with the strides of a transposed (1, k) matrix: torch's CPU bmm takes a ~10x faster path
        # for this layout than for a contiguous (k, 1) one (0.12 vs 1.2 ms at n = k = 1024, one row per member)
        b = b.as_strided(b.shape, (b.stride(0), 1, b.shape[1]), b.storage_offset())
    signs = _repeat_signs(x4.shape[0], antithetic, sigma)
    if len(signs) > _LOOP_REPEATS or torch._C._functorch.maybe_current_level() is not None:
        # many repeats (a shared input: one tiny bmm per repeat would cost more than the product), or inside a
        # torch.func transform (addcmul_/baddbmm_ have no vmap batching rule; torch would loop over the members):
        # every repeat in one product, formed, scaled by σ c_r, then added
        h = torch.matmul(x4, b)  # (R, n, t, r)
        prod = h * a_t if rank == 1 else torch.matmul(h, a_t)  # (R, n, t, m)
        if noise_b is not None:
            prod.add_(noise_b.unsqueeze(1))
        out4.add_(_scale_(prod, antithetic, sigma))
        return out
    # few repeats: one at a time, in the rows' own layout, no copy of x, of the output or of the factors (at batch =
    # population = 1024, (1024, 1024), copies of b, [a; ε] and [h, 1] per call cost 0.2-0.3x of the plain GEMM)
    for rep, c in enumerate(signs):
        h = torch.bmm(x4[rep], b)  # (n, t, r): x_i b_k
        if rank == 1:  # the outer product as one broadcast pass
            out4[rep].addcmul_(h, a_t, value=c)
        else:
            out4[rep].baddbmm_(h, a_t, alpha=c)  # out += c σ (x b_k) a_kᵀ, accumulated in place
        if noise_b is not None:
            out4[rep].add_(noise_b.unsqueeze(1), alpha=c)
    return out


def lowrank_dense(a: Tensor, b: Tensor, weight_shape: Sequence[int], *, sigma: float = 1.0) -> Tensor:
    """Dense ``σ E_k = σ a_k b_kᵀ`` reshaped to ``(n, *weight_shape)``.

    Args:
        a: ``(n, out, r)``.
        b: ``(n, in·|kernel|, r)``.
        weight_shape: ``(out, in, *kernel)``.
        sigma: Scale ``σ``.

    Returns:
        ``(n, *weight_shape)``.
    """
    return _scale_((a @ b.transpose(1, 2)).view(a.shape[0], *weight_shape), False, _check_sigma(sigma))


def lowrank_weighted_sum(
    w: Tensor, a: Tensor, b: Tensor, weight_shape: Sequence[int], *, sigma: float = 1.0
) -> Tensor:
    """``Σ_k w_k σ a_k b_kᵀ``: one ``(out × n·r)·(n·r × in·|kernel|)`` GEMM.

    Args:
        w: ``(n,)`` weights.
        a: ``(n, out, r)``.
        b: ``(n, in·|kernel|, r)``.
        weight_shape: ``(out, in, *kernel)``.
        sigma: Scale ``σ``.

    Returns:
        Tensor of shape ``weight_shape``.
    """
    _check_noise("w", w, (a.shape[0],))
    k, m, r = a.shape
    aw = (a * w[:, None, None]).permute(1, 0, 2).reshape(m, k * r)
    g = (aw @ b.transpose(1, 2).reshape(k * r, b.shape[1])).view(*weight_shape)
    return _scale_(g, False, _check_sigma(sigma))


def lowrank_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
    stride: _Size2 = 1,
    padding: _Size2 | str = 0,
    dilation: _Size2 = 1,
) -> Tensor:
    """Population forward of a Conv2d layer with rank-``r`` filter noise ``E_k = a_k b_kᵀ`` (EGGROLL).

    ``b_k`` holds ``r`` filters over ``(C_in, kh, kw)``; ``a_k`` mixes them into the ``C_out`` outputs: one grouped
    convolution producing ``r`` channels per member plus a per-member ``1×1`` mixing. ``groups`` is 1.

    Args:
        x: ``(R * n, C_in, H, W)``, member index fastest.
        weight: ``(C_out, C_in, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        a: ``(n, C_out, r)``.
        b: ``(n, C_in·kh·kw, r)``.
        noise_b: ``(n, C_out)`` or ``None``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        stride: As ``F.conv2d``.
        padding: As ``F.conv2d``.
        dilation: As ``F.conv2d``.

    Returns:
        ``(R * n, C_out, H_out, W_out)``.
    """
    m, c = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    n, r = _lowrank_checks(weight, a, b, noise_b)
    sigma = _check_sigma(sigma)
    out, x5 = _conv_base(x, weight, bias, n, antithetic, stride, padding, dilation, 1)
    reps = x5.shape[0]
    filters = b.transpose(1, 2).reshape(n * r, c, *kernel)
    h = F.conv2d(x5.reshape(reps, n * c, *x5.shape[3:]), filters, None, stride, padding, dilation, n)
    out_hw = h.shape[2:]
    if r == 1:
        v = h.view(reps, n, 1, *out_hw) * a.view(1, n, m, 1, 1)
    else:
        hm = h.view(reps, n, r, -1).permute(1, 2, 0, 3).reshape(n, r, -1)  # (n, r, R*L)
        v = torch.bmm(a, hm).view(n, m, reps, *out_hw).permute(2, 0, 1, 3, 4)
    return _add_conv_noise_(out, v, noise_b, antithetic, sigma)
