"""Sparse mode (Linear only): ``E_k`` is zero except ``s`` input columns per member (NESgpu's ``Sparse``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    _bmm_members,
    _check_index,
    _check_noise,
    _check_sigma,
    _linear_base,
    _scale_,
)

__all__ = ["sparse_dense", "sparse_linear", "sparse_weighted_sum"]


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cols: Tensor,
    values: Tensor,
    noise_b: Tensor | None = None,
    *,
    sigma: float = 1.0,
    antithetic: bool = False,
) -> Tensor:
    """Population forward of a Linear layer whose ``E_k`` has ``s`` non-zero input columns (NESgpu's Sparse).

    Gathers the ``s`` inputs of each member and does a batched ``(·, s) @ (s, out)`` product.

    Args:
        x: ``(R * n, *, in_features)``, member index fastest.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        cols: ``(n, s)`` int64, distinct input columns per member.
        values: ``(n, out_features, s)``: ``E_k[:, cols[k]]``.
        noise_b: ``(n, out_features)`` or ``None``.
        sigma: Scale ``σ``.
        antithetic: Negate the noise in the second half of an even number of repeats.

    Returns:
        ``(R * n, *, out_features)``.
    """
    m, k_in = weight.shape
    n = cols.shape[0] if isinstance(cols, Tensor) and cols.dim() == 2 else None
    _check_index("cols", cols, n, k_in)
    n, s = cols.shape  # checked: (n, s)
    _check_noise("values", values, (n, m, s))
    _check_noise("noise_b", noise_b, (n, m))
    sigma = _check_sigma(sigma)
    out, x4, out4 = _linear_base(x, weight, bias, n, antithetic)
    reps, _, t, _ = x4.shape
    xg = torch.gather(x4, 3, cols.view(1, n, 1, s).expand(reps, n, t, s))
    out4 += _scale_(_bmm_members(xg, values.transpose(1, 2), noise_b), antithetic, sigma)
    return out


def sparse_dense(cols: Tensor, values: Tensor, in_features: int, *, sigma: float = 1.0) -> Tensor:
    """Dense ``σ E_k`` of the sparse mode: ``(n, out_features, in_features)``.

    Args:
        cols: ``(n, s)`` int64.
        values: ``(n, out_features, s)``.
        in_features: Input width.
        sigma: Scale ``σ``.

    Returns:
        ``(n, out_features, in_features)``.
    """
    k, m, s = values.shape
    dense = torch.zeros((k, m, in_features), dtype=values.dtype, device=values.device)
    dense.scatter_(2, cols[:, None, :].expand(k, m, s), values)
    return _scale_(dense, False, _check_sigma(sigma))


def sparse_weighted_sum(
    w: Tensor, cols: Tensor, values: Tensor, in_features: int, *, sigma: float = 1.0
) -> Tensor:
    """``Σ_k w_k σ E_k`` of the sparse mode: a scatter-add of ``n·m·s`` values.

    Args:
        w: ``(n,)`` weights.
        cols: ``(n, s)`` int64.
        values: ``(n, out_features, s)``.
        in_features: Input width.
        sigma: Scale ``σ``.

    Returns:
        ``(out_features, in_features)``.
    """
    _check_noise("w", w, (values.shape[0],))
    m = values.shape[1]
    contrib = (values * w[:, None, None]).permute(1, 0, 2).reshape(m, values.shape[0] * values.shape[2])
    g = torch.zeros((m, in_features), dtype=values.dtype, device=values.device)
    g.index_add_(1, cols.reshape(-1), contrib)
    return _scale_(g, False, _check_sigma(sigma))
