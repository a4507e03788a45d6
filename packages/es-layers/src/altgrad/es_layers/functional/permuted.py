"""Permuted mode: one shared noise matrix whose inputs and/or outputs each member permutes (NESgpu's
``Permuted``; partial permutations give sparsity)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _add_conv_noise_,
    _add_member_noise_,
    _addmm_scaled,
    _check_index,
    _check_noise,
    _check_sigma,
    _conv_base,
    _linear_base,
    _members,
    _scale_,
    _Size2,
)

__all__ = [
    "inverse_injection",
    "permuted_conv2d",
    "permuted_dense",
    "permuted_linear",
    "permuted_weighted_sum",
]


# Permuted update: elements per sub-chunk when the members' contributions are scattered directly, and the cost of
# one scattered element update in GEMM multiply-adds (chooses scatter vs. the P = Σ w_k Π_k GEMM).
_SCATTER_ELEMENTS = 1 << 22
_SCATTER_PENALTY = 32


def inverse_injection(idx: Tensor, size: int) -> Tensor:
    """Inverse map of per-member injections, padded: ``inv[k, idx[k, i]] = i`` and ``inv[k, o] = s`` elsewhere.

    Args:
        idx: ``(n, s)`` int64, distinct entries in ``[0, size)`` per row (``ρ_k``).
        size: The size of the target dimension.

    Returns:
        ``(n, size)`` int64; gathering from a ``(..., s + 1)`` tensor whose last entry is 0 places the ``s``
        values at ``idx[k]`` and zeros elsewhere.
    """
    s = idx.shape[1]
    inv = torch.full((idx.shape[0], size), s, dtype=torch.int64, device=idx.device)
    return inv.scatter_(1, idx, torch.arange(s, device=idx.device).expand_as(idx))


def _permuted_checks(weight, shared, in_idx, out_idx, noise_b):
    m, k_in = weight.shape[:2]
    n = _members("permuted", in_idx=in_idx, out_idx=out_idx, noise_b=noise_b)
    _check_index("in_idx", in_idx, n, k_in)
    _check_index("out_idx", out_idx, n, m)
    m_sp = m if out_idx is None else out_idx.shape[1]
    n_sp = k_in if in_idx is None else in_idx.shape[1]
    _check_noise("shared", shared, (m_sp, n_sp, *weight.shape[2:]))
    _check_noise("noise_b", noise_b, (n, m))
    return n, m_sp, n_sp


def permuted_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    shared: Tensor,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
    out_inv: Tensor | None = None,
) -> Tensor:
    """Population forward of a Linear layer with one shared noise matrix, permuted per member (NESgpu's Permuted).

    Input side: gather the inputs by ``π_k``; one shared GEMM accumulated into the base output (when only the
    inputs are permuted); output side: an index gather by ``ρ_k⁻¹``.

    Args:
        x: ``(R * n, *, in_features)``, member index fastest.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        shared: ``(m_sp, n_sp)``: the shared ``E`` (``m_sp = out_features`` without ``out_idx``,
            ``n_sp = in_features`` without ``in_idx``).
        in_idx: ``(n, n_sp)`` int64, ``π_k`` (distinct input columns), or ``None``.
        out_idx: ``(n, m_sp)`` int64, ``ρ_k`` (distinct output rows), or ``None``.
        noise_b: ``(n, out_features)`` or ``None``. At least one of ``in_idx``, ``out_idx``, ``noise_b`` is needed.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        out_inv: Optional precomputed ``inverse_injection(out_idx, out_features)``.

    Returns:
        ``(R * n, *, out_features)``.
    """
    n, m_sp, n_sp = _permuted_checks(weight, shared, in_idx, out_idx, noise_b)
    sigma = _check_sigma(sigma)
    out, x4, out4 = _linear_base(x, weight, bias, n, antithetic)
    reps, _, t, k_in = x4.shape
    if in_idx is not None:
        if t == 1:
            offsets = (in_idx + torch.arange(n, device=x4.device)[:, None] * k_in).reshape(-1)
            xg = x4.reshape(reps, n * k_in).index_select(1, offsets)
        else:
            xg = torch.gather(x4, 3, in_idx.view(1, n, 1, n_sp).expand(reps, n, t, n_sp))
        xg = xg.reshape(reps, n, t, n_sp)
    else:
        xg = x4
    if out_idx is None:
        _addmm_scaled(xg, shared.t(), out4, noise_b, antithetic, sigma)
        return out
    if out_inv is None:
        out_inv = inverse_injection(out_idx, weight.shape[0])
    v = xg.reshape(math.prod(xg.shape[:-1]), n_sp) @ shared.t()  # (R*n*t, m_sp)
    v = F.pad(v, (0, 1)).view(reps, n, t, m_sp + 1)
    p = torch.gather(v, 3, out_inv.view(1, n, 1, -1).expand(reps, n, t, weight.shape[0]))
    _add_member_noise_(out4, p, noise_b, antithetic, sigma)
    return out


def permuted_dense(
    shared: Tensor,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    weight_shape: Sequence[int],
    *,
    sigma: float = 1.0,
) -> Tensor:
    """Dense ``σ E_k`` of the permuted mode: ``(n, *weight_shape)``.

    Args:
        shared: ``(m_sp, n_sp, *kernel)``.
        in_idx: ``(n, n_sp)`` int64 or ``None``.
        out_idx: ``(n, m_sp)`` int64 or ``None`` (at least one of them).
        weight_shape: ``(out, in, *kernel)``.
        sigma: Scale ``σ``.

    Returns:
        ``(n, *weight_shape)``.
    """
    m, n_in = weight_shape[:2]
    kernel = tuple(weight_shape[2:])
    m_sp, n_sp = shared.shape[:2]
    k = (in_idx if in_idx is not None else out_idx).shape[0]  # type: ignore[union-attr]
    x = shared.unsqueeze(0).expand(k, *shared.shape)
    if in_idx is not None:
        idx = in_idx.view(k, 1, n_sp, *([1] * len(kernel)))
        cols = torch.zeros((k, m_sp, n_in, *kernel), dtype=shared.dtype, device=shared.device)
        x = cols.scatter_(2, idx.expand(k, m_sp, n_sp, *kernel), x)
    if out_idx is not None:
        idx = out_idx.view(k, m_sp, *([1] * (1 + len(kernel))))
        rows = torch.zeros((k, m, n_in, *kernel), dtype=shared.dtype, device=shared.device)
        x = rows.scatter_(1, idx.expand(k, m_sp, n_in, *kernel), x)
    return _scale_(x.contiguous(), False, _check_sigma(sigma))


def permuted_weighted_sum(
    w: Tensor,
    shared: Tensor,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    weight_shape: Sequence[int],
    *,
    sigma: float = 1.0,
) -> Tensor:
    """``Σ_k w_k σ E_k`` of the permuted mode.

    One side: ``E · P`` with ``P = Σ_k w_k Π_k`` built by a scatter-add and one GEMM, or (few members) a direct
    scatter of ``w_k E`` in bounded sub-chunks; both sides: a scatter-add of ``n·m_sp·n_sp`` values.

    Args:
        w: ``(n,)`` weights.
        shared: ``(m_sp, n_sp, *kernel)``.
        in_idx: ``(n, n_sp)`` int64 or ``None``.
        out_idx: ``(n, m_sp)`` int64 or ``None`` (at least one of them).
        weight_shape: ``(out, in, *kernel)``.
        sigma: Scale ``σ``.

    Returns:
        Tensor of shape ``weight_shape``.
    """
    sigma = _check_sigma(sigma)
    e = shared
    m, n_in = weight_shape[:2]
    kernel = tuple(weight_shape[2:])
    m_sp, n_sp = e.shape[:2]
    k = w.shape[0]
    if in_idx is not None and out_idx is not None:
        # G[ρ_k(i), π_k(j)] += w_k E[i, j]
        flat = (out_idx[:, :, None] * n_in + in_idx[:, None, :]).reshape(-1)
        vals = (w[:, None, None, None] * e.reshape(m_sp, n_sp, -1)[None]).reshape(flat.numel(), -1)
        g = torch.zeros((m * n_in, vals.shape[1]), dtype=e.dtype, device=e.device)
        return _scale_(g.index_add_(0, flat, vals).view(*weight_shape), False, sigma)
    if in_idx is None and out_idx is None:
        return _scale_(e * w.sum(), False, sigma)
    if k * _SCATTER_PENALTY < (n_in if in_idx is not None else m):
        # few members: scatter w_k E directly, O(N·|E|) element updates instead of the O(|E|·n) GEMM
        g = torch.zeros(tuple(weight_shape), dtype=e.dtype, device=e.device)
        step = max(1, _SCATTER_ELEMENTS // e.numel())
        for s0 in range(0, k, step):
            wc = w[s0 : s0 + step]
            kc = wc.shape[0]
            if in_idx is not None:
                src = e.unsqueeze(1) * wc.view(1, kc, *([1] * (e.dim() - 1)))
                g.index_add_(1, in_idx[s0 : s0 + step].reshape(-1), src.reshape(m, kc * n_sp, *kernel))
            else:
                assert out_idx is not None  # both None returned above
                src = wc.view(kc, *([1] * e.dim())) * e.unsqueeze(0)
                g.index_add_(0, out_idx[s0 : s0 + step].reshape(-1), src.reshape(kc * m_sp, *e.shape[1:]))
        return _scale_(g, False, sigma)
    if in_idx is not None:
        p = torch.zeros(n_sp * n_in, dtype=e.dtype, device=e.device)
        flat = (in_idx + torch.arange(n_sp, device=in_idx.device) * n_in).reshape(-1)
        p.index_add_(0, flat, w[:, None].expand_as(in_idx).reshape(-1))
        # G[o, c, kern] = Σ_j E[o, j, kern] P[j, c]
        g = (e.movedim(1, -1) @ p.view(n_sp, n_in)).movedim(-1, 1).contiguous()
        return _scale_(g, False, sigma)
    assert out_idx is not None  # both None returned above
    q = torch.zeros(m * m_sp, dtype=e.dtype, device=e.device)
    flat = (out_idx * m_sp + torch.arange(m_sp, device=out_idx.device)).reshape(-1)
    q.index_add_(0, flat, w[:, None].expand_as(out_idx).reshape(-1))
    g = (q.view(m, m_sp) @ e.reshape(m_sp, math.prod(e.shape[1:]))).view(*weight_shape)
    return _scale_(g, False, sigma)


def permuted_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    shared: Tensor,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
    stride: _Size2 = 1,
    padding: _Size2 | str = 0,
    dilation: _Size2 = 1,
    out_inv: Tensor | None = None,
) -> Tensor:
    """Population forward of a Conv2d layer with one shared filter bank, channels permuted per member.

    Input channels: an ``index_select`` of the ``(R, n·C_in, H, W)`` view; one ordinary convolution with
    ``shared``; output channels: an index gather. ``groups`` is 1.

    Args:
        x: ``(R * n, C_in, H, W)``, member index fastest.
        weight: ``(C_out, C_in, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        shared: ``(m_sp, n_sp, kh, kw)``.
        in_idx: ``(n, n_sp)`` int64 input channels, or ``None``.
        out_idx: ``(n, m_sp)`` int64 output channels, or ``None``.
        noise_b: ``(n, C_out)`` or ``None``. At least one of ``in_idx``, ``out_idx``, ``noise_b`` is needed.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        stride: As ``F.conv2d``.
        padding: As ``F.conv2d``.
        dilation: As ``F.conv2d``.
        out_inv: Optional precomputed ``inverse_injection(out_idx, C_out)``.

    Returns:
        ``(R * n, C_out, H_out, W_out)``.
    """
    n, m_sp, n_sp = _permuted_checks(weight, shared, in_idx, out_idx, noise_b)
    sigma = _check_sigma(sigma)
    out, x5 = _conv_base(x, weight, bias, n, antithetic, stride, padding, dilation, 1)
    reps, _, c = x5.shape[:3]
    hw = x5.shape[3:]
    if in_idx is not None:
        offsets = (in_idx + torch.arange(n, device=x5.device)[:, None] * c).reshape(-1)
        xg = x5.reshape(reps, n * c, *hw).index_select(1, offsets).view(reps * n, n_sp, *hw)
    else:
        xg = x5.reshape(reps * n, c, *hw)
    v = F.conv2d(xg, shared, None, stride, padding, dilation, 1)  # (R*n, m_sp, H', W')
    out_hw = v.shape[2:]
    if out_idx is not None:
        if out_inv is None:
            out_inv = inverse_injection(out_idx, weight.shape[0])
        v = F.pad(v.view(reps, n, m_sp, math.prod(out_hw)), (0, 0, 0, 1))  # a zero channel at the end
        offsets = out_inv + torch.arange(n, device=x5.device)[:, None] * (m_sp + 1)
        v = v.view(reps, n * (m_sp + 1), math.prod(out_hw)).index_select(1, offsets.reshape(-1))
    return _add_conv_noise_(out, v.view(reps, n, weight.shape[0], *out_hw), noise_b, antithetic, sigma)
