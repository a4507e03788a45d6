"""Embedding lookups of a population: row ``idx`` of ``W + c σ E_k`` for each family whose rows are cheap.

``W`` is ``(V, d)`` (as the weight of the output ``Linear`` it may be tied to: ``V`` outputs, ``d`` inputs), ``idx``
is ``(R * n, *)`` int64 with the member index fastest. Each function returns ``F.embedding(idx, W)`` plus the
member's noise rows, never forming ``E_k`` except in the IID mode (whose ``E_k`` is dense anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import _check_noise, _check_sigma, _repeats, _scale_

__all__ = ["flipout_embedding", "lowrank_embedding", "perturbed_embedding"]


def _embedding_base(idx: Tensor, weight: Tensor, n: int, antithetic: bool):
    """``out = W[idx]`` and the ``(R, n, T)`` view of the indices and ``(R, n, T, d)`` view of the output."""
    if not isinstance(idx, Tensor) or idx.dim() < 1 or idx.dtype not in (torch.int64, torch.int32):
        shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an integer tensor of shape (repeats * n, *), got {shape}")
    reps = _repeats(idx.shape[0], n, antithetic)
    out = F.embedding(idx, weight).contiguous()
    i3 = idx.reshape(reps, n, -1)
    return out, i3, out.view(reps, n, -1, weight.shape[1])


def _member_rows(t: Tensor, i3: Tensor) -> Tensor:
    """``t[k, i3[r, k, j]]`` for ``t (n, V, ...)``: ``(R, n, T, ...)``."""
    members = torch.arange(t.shape[0], device=i3.device).view(1, -1, 1)
    return t[members, i3]


def perturbed_embedding(
    idx: Tensor, weight: Tensor, noise_w: Tensor, *, sigma: float = 1.0, antithetic: bool = False
) -> Tensor:
    """Population lookup with dense per-member noise: ``W[idx] + c σ E_k[idx]``.

    Args:
        idx: ``(R * n, *)`` int64, member index fastest.
        weight: ``(V, d)``.
        noise_w: ``(n, V, d)``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.

    Returns:
        ``(R * n, *, d)``.
    """
    n = noise_w.shape[0]
    _check_noise("noise_w", noise_w, (n, *weight.shape))
    sigma = _check_sigma(sigma)
    out, i3, out4 = _embedding_base(idx, weight, n, antithetic)
    out4 += _scale_(_member_rows(noise_w, i3), antithetic, sigma)
    return out


def lowrank_embedding(
    idx: Tensor, weight: Tensor, a: Tensor, b: Tensor, *, sigma: float = 1.0, antithetic: bool = False
) -> Tensor:
    """Population lookup with rank-``r`` noise ``E_k = a_k b_kᵀ``: row ``v`` of ``E_k`` is ``a_k[v] b_kᵀ``.

    Args:
        idx: ``(R * n, *)`` int64, member index fastest.
        weight: ``(V, d)``.
        a: ``(n, V, r)``.
        b: ``(n, d, r)``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.

    Returns:
        ``(R * n, *, d)``.
    """
    n = a.shape[0] if isinstance(a, Tensor) and a.dim() == 3 else None
    _check_noise("a", a, (n, weight.shape[0], None))
    n, _, r = a.shape
    _check_noise("b", b, (n, weight.shape[1], r))
    sigma = _check_sigma(sigma)
    out, i3, out4 = _embedding_base(idx, weight, n, antithetic)
    reps, _, t = i3.shape
    h = _member_rows(a, i3).permute(1, 0, 2, 3).reshape(n, reps * t, r)
    p = torch.bmm(h, b.transpose(1, 2)).view(n, reps, t, -1).permute(1, 0, 2, 3)
    out4 += _scale_(p, antithetic, sigma)
    return out


def flipout_embedding(
    idx: Tensor,
    weight: Tensor,
    shared: Tensor,
    in_sign: Tensor | None,
    out_sign: Tensor | None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
) -> Tensor:
    """Population lookup with sign-flip noise ``E_k = diag(r_k) E diag(s_k)``: row ``v`` is ``r_k[v] E[v] ∘ s_k``.

    Args:
        idx: ``(R * n, *)`` int64, member index fastest.
        weight: ``(V, d)``.
        shared: ``(V, d)``: the shared ``E``.
        in_sign: ``(n, d)`` of ±1 or ``None``.
        out_sign: ``(n, V)`` of ±1 or ``None`` (at least one of them).
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.

    Returns:
        ``(R * n, *, d)``.
    """
    signs = in_sign if in_sign is not None else out_sign
    if signs is None:
        raise ValueError("flipout_embedding: give at least one of in_sign, out_sign (they set the members)")
    n = signs.shape[0]
    _check_noise("shared", shared, tuple(weight.shape))
    _check_noise("in_sign", in_sign, (n, weight.shape[1]))
    _check_noise("out_sign", out_sign, (n, weight.shape[0]))
    sigma = _check_sigma(sigma)
    out, i3, out4 = _embedding_base(idx, weight, n, antithetic)
    p = F.embedding(i3, shared)  # (R, n, T, d)
    if out_sign is not None:
        p *= _member_rows(out_sign, i3).unsqueeze(-1)
    if in_sign is not None:
        p *= in_sign[None, :, None, :]
    out4 += _scale_(p, antithetic, sigma)
    return out
