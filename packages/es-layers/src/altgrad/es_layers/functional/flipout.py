"""Flipout (sign-flip) mode: ``E_k = diag(r_k) · E · diag(s_k)`` with one shared ``E`` (NESgpu's
``Synthetic``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _add_conv_noise_,
    _add_member_noise_,
    _addmm_scaled,
    _check_noise,
    _check_sigma,
    _conv_base,
    _linear_base,
    _members,
    _scale_,
    _Size2,
)

__all__ = ["flipout_conv2d", "flipout_dense", "flipout_linear", "flipout_weighted_sum"]


def _flip_checks(weight, shared, in_sign, out_sign, noise_b, groups):
    n = _members("flipout", in_sign=in_sign, out_sign=out_sign, noise_b=noise_b)
    _check_noise("shared", shared, tuple(weight.shape))
    _check_noise("in_sign", in_sign, (n, weight.shape[1] * groups))
    _check_noise("out_sign", out_sign, (n, weight.shape[0]))
    _check_noise("noise_b", noise_b, (n, weight.shape[0]))
    return n


def flipout_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    shared: Tensor,
    in_sign: Tensor | None = None,
    out_sign: Tensor | None = None,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
) -> Tensor:
    """Population forward of a Linear layer with sign-flip noise (Flipout; NESgpu's ``SyntheticLinear``).

    ``x_i E_kᵀ = ((x_i ∘ s_k) Eᵀ) ∘ r_k``: one extra GEMM (accumulated into the base output when only the inputs
    are flipped).

    Args:
        x: ``(R * n, *, in_features)``, member index fastest.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        shared: ``(out_features, in_features)``: the shared ``E``.
        in_sign: ``(n, in_features)`` of ±1 (``s_k``) or ``None``.
        out_sign: ``(n, out_features)`` of ±1 (``r_k``) or ``None``.
        noise_b: ``(n, out_features)`` or ``None``. At least one of ``in_sign``, ``out_sign``, ``noise_b``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.

    Returns:
        ``(R * n, *, out_features)``.
    """
    n = _flip_checks(weight, shared, in_sign, out_sign, noise_b, 1)
    sigma = _check_sigma(sigma)
    out, x4, out4 = _linear_base(x, weight, bias, n, antithetic)
    xs = x4 * in_sign[None, :, None, :] if in_sign is not None else x4
    if out_sign is None:
        _addmm_scaled(xs, shared.t(), out4, noise_b, antithetic, sigma)
        return out
    p = (xs.reshape(math.prod(xs.shape[:-1]), weight.shape[1]) @ shared.t()).view(out4.shape)
    p *= out_sign[None, :, None, :]
    _add_member_noise_(out4, p, noise_b, antithetic, sigma)
    return out


def _in_sign_per_row(s: Tensor, m: int, npg: int, groups: int) -> Tensor:
    """Map input signs ``(..., n_total)`` to ``(..., m, n_per_group)`` following the conv groups."""
    if groups == 1:
        return s.unsqueeze(-2).expand(*s.shape[:-1], m, npg)
    group_of_row = torch.arange(m, device=s.device) // (m // groups)
    return s.reshape(*s.shape[:-1], groups, npg).index_select(-2, group_of_row)


def flipout_dense(
    shared: Tensor,
    in_sign: Tensor | None,
    out_sign: Tensor | None,
    *,
    groups: int = 1,
    sigma: float = 1.0,
) -> Tensor:
    """Dense ``σ E_k = σ diag(r_k) E diag(s_k)`` of the Flipout mode: ``(n, *shared.shape)``.

    Args:
        shared: ``(m, n_in / groups, *kernel)``.
        in_sign: ``(n, n_in)`` or ``None``.
        out_sign: ``(n, m)`` or ``None`` (at least one of them).
        groups: Conv groups (input sign ``c`` applies to the rows of its group).
        sigma: Scale ``σ``.

    Returns:
        ``(n, *shared.shape)``.
    """
    m, npg = shared.shape[:2]
    kernel = tuple(shared.shape[2:])
    k = (in_sign if in_sign is not None else out_sign).shape[0]  # type: ignore[union-attr]
    mult = torch.ones((k, m, npg), dtype=shared.dtype, device=shared.device)
    if in_sign is not None:
        mult = mult * _in_sign_per_row(in_sign, m, npg, groups)
    if out_sign is not None:
        mult = mult * out_sign[:, :, None]
    return _scale_(
        shared.unsqueeze(0) * mult.view(*mult.shape, *([1] * len(kernel))), False, _check_sigma(sigma)
    )


def flipout_weighted_sum(
    w: Tensor,
    shared: Tensor,
    in_sign: Tensor | None,
    out_sign: Tensor | None,
    *,
    groups: int = 1,
    sigma: float = 1.0,
) -> Tensor:
    """``Σ_k w_k σ E_k = σ E ∘ (Σ_k w_k r_k s_kᵀ)`` of the Flipout mode (linear in ``w``).

    Args:
        w: ``(n,)`` weights.
        shared: ``(m, n_in / groups, *kernel)``.
        in_sign: ``(n, n_in)`` or ``None``.
        out_sign: ``(n, m)`` or ``None`` (at least one of them).
        groups: Conv groups.
        sigma: Scale ``σ``.

    Returns:
        Tensor of ``shared``'s shape.
    """
    m, npg = shared.shape[:2]
    kernel = tuple(shared.shape[2:])
    if in_sign is not None and out_sign is not None:
        mat = (out_sign * w[:, None]).t() @ in_sign  # (m, n_total)
        if groups > 1:
            group_of_row = torch.arange(m, device=mat.device) // (m // groups)
            mat = mat.gather(1, group_of_row[:, None] * npg + torch.arange(npg, device=mat.device))
        mult = mat
    elif in_sign is not None:
        mult = _in_sign_per_row(w @ in_sign, m, npg, groups)
    elif out_sign is not None:
        mult = (w @ out_sign)[:, None].expand(m, npg)
    else:
        mult = w.sum().expand(m, npg)
    g = shared * mult.reshape(m, npg, *([1] * len(kernel)))
    return _scale_(g, False, _check_sigma(sigma))


def flipout_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    shared: Tensor,
    in_sign: Tensor | None = None,
    out_sign: Tensor | None = None,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
    stride: _Size2 = 1,
    padding: _Size2 | str = 0,
    dilation: _Size2 = 1,
    groups: int = 1,
) -> Tensor:
    """Population forward of a Conv2d layer with channel sign flips (Flipout; NESgpu's ``SyntheticConv2d``).

    One extra ordinary convolution of ``x ∘ s_k`` with ``shared``, then ``∘ r_k``. Works with ``groups > 1``.

    Args:
        x: ``(R * n, C_in, H, W)``, member index fastest.
        weight: ``(C_out, C_in / groups, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        shared: Same shape as ``weight``.
        in_sign: ``(n, C_in)`` of ±1 or ``None``.
        out_sign: ``(n, C_out)`` of ±1 or ``None``.
        noise_b: ``(n, C_out)`` or ``None``. At least one of ``in_sign``, ``out_sign``, ``noise_b``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        stride: As ``F.conv2d``.
        padding: As ``F.conv2d``.
        dilation: As ``F.conv2d``.
        groups: As ``F.conv2d``.

    Returns:
        ``(R * n, C_out, H_out, W_out)``.
    """
    n = _flip_checks(weight, shared, in_sign, out_sign, noise_b, groups)
    sigma = _check_sigma(sigma)
    out, x5 = _conv_base(x, weight, bias, n, antithetic, stride, padding, dilation, groups)
    reps = x5.shape[0]
    xs = x5 * in_sign[None, :, :, None, None] if in_sign is not None else x5
    v = F.conv2d(xs.reshape(reps * n, *x5.shape[2:]), shared, None, stride, padding, dilation, groups)
    v = v.view(reps, n, *v.shape[1:])
    if out_sign is not None:
        v *= out_sign[None, :, :, None, None]
    return _add_conv_noise_(out, v, noise_b, antithetic, sigma)
