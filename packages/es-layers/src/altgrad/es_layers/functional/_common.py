"""Shared plumbing of the perturbation families: argument checks, the population layout (repeats, member
index fastest, antithetic signs) and the base ``x Wᵀ + b`` / ``conv(x, W) + b`` every mode adds its term to."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_Size2 = int | Sequence[int]


def _check_noise(name: str, t: Tensor | None, shape: tuple[int | None, ...]) -> None:
    """``t`` must have ``len(shape)`` dims matching ``shape`` (``None`` = any size)."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_index(name: str, t: Tensor | None, n: int | None, size: int) -> None:
    if t is None:
        return
    _check_noise(name, t, (n, None))
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {t.dtype}")
    if t.shape[1] > size:
        raise ValueError(f"{name} must have at most {size} columns (distinct indices), got {t.shape[1]}")


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float, got {type(sigma).__name__}")
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite, got {sigma}")
    return float(sigma)


def _members(mode: str, **named: Tensor | None) -> int:
    """Member count ``n`` from the first of ``named`` that is a tensor (mode needs at least one of them)."""
    n = next((t.shape[0] for t in named.values() if isinstance(t, Tensor) and t.dim() >= 1), None)
    if n is None:
        raise ValueError(f"{mode}: give at least one of {', '.join(named)} (they set the members)")
    return n


def _repeats(rows: int, n: int, antithetic: bool) -> int:
    """Number of repeats ``R`` of ``rows = R * n``; checks the antithetic rule."""
    if n < 1:
        raise ValueError("the noise must hold at least one member (first dimension >= 1)")
    if rows % n:
        raise ValueError(
            f"x: the batch size ({rows}) must be a multiple of the number of members ({n}); "
            f"expected x of shape (repeats * {n}, ...) with the member index fastest"
        )
    r = rows // n
    if antithetic and r > 1 and r % 2:
        raise ValueError(
            f"x: antithetic sampling needs 1 or an even number of repeats, got {r} (batch {rows} = {r} x {n})"
        )
    return r


def _repeat_signs(reps: int, antithetic: bool, sigma: float) -> list[float]:
    """``σ c_r`` for each repeat: ``c_r = -1`` on the second half of an even number of antithetic repeats."""
    if antithetic and reps > 1:
        return [sigma] * (reps // 2) + [-sigma] * (reps // 2)
    return [sigma] * reps


def _scale_(p: Tensor, antithetic: bool, sigma: float) -> Tensor:
    """Multiply ``p`` (first dim = repeats) in place by ``σ c_r`` (`_repeat_signs`)."""
    reps = p.shape[0]
    if antithetic and reps > 1:
        s = torch.tensor(_repeat_signs(reps, antithetic, sigma), dtype=p.dtype, device=p.device)
        p.mul_(s.view(-1, *([1] * (p.dim() - 1))))
    elif sigma != 1.0:
        p.mul_(sigma)
    return p


def _linear_repeats(x: Tensor, in_features: int, n: int, antithetic: bool) -> int:
    """Checks a Linear population input ``(R * n, *, in_features)`` and returns ``R``."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-1] != in_features:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (repeats * n, *, {in_features}), got {shape}")
    return _repeats(x.shape[0], n, antithetic)


def _byte_range(t: Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` bytes of ``t``'s elements in its storage (empty for an empty tensor)."""
    if t.numel() == 0:
        return 0, 0
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (span + 1) * t.element_size()


def _check_no_overlap(out: Tensor, **inputs: Tensor | None) -> None:
    """Refuse an ``out=`` whose memory may overlap one of ``inputs`` (writing it would corrupt what is read).

    Two tensors overlap here when they share a storage and their byte ranges intersect (a conservative test:
    interleaved strided views of one buffer are refused too).
    """
    lo, hi = _byte_range(out)
    if lo == hi:
        return
    for name, t in inputs.items():
        if not isinstance(t, Tensor) or t.device != out.device:
            continue
        a, b = _byte_range(t)
        if a < hi and lo < b and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise ValueError(f"out must not overlap the input {name!r} (it is read while out is written)")


def _linear_views(x: Tensor, out: Tensor, reps: int, n: int) -> tuple[Tensor, Tensor]:
    """The ``(R, n, T, in)`` and ``(R, n, T, out)`` views of a Linear input and output (``T`` = middle dims)."""
    t = math.prod(x.shape[1:-1])
    return x.reshape(reps, n, t, x.shape[-1]), out.view(reps, n, t, out.shape[-1])


def _linear_base(x: Tensor, weight: Tensor, bias: Tensor | None, n: int, antithetic: bool):
    """``out = x Wᵀ + b`` and the ``(R, n, T, ·)`` views of input and output."""
    reps = _linear_repeats(x, weight.shape[1], n, antithetic)
    out = F.linear(x, weight, bias)
    if not out.is_contiguous():
        out = out.contiguous()
    x4, out4 = _linear_views(x, out, reps, n)
    return out, x4, out4


def _bmm_members(x4: Tensor, mats: Tensor, noise_b: Tensor | None) -> Tensor:
    """Per-member ``x_k @ mats_k (+ ε_k)``: ``x4 (R, n, T, k)``, ``mats (n, k, m)`` → ``(R, n, T, m)``."""
    reps, n, t, k = x4.shape
    xm = x4.permute(1, 0, 2, 3).reshape(n, reps * t, k)
    p = torch.bmm(xm, mats) if noise_b is None else torch.baddbmm(noise_b.unsqueeze(1), xm, mats)
    return p.view(n, reps, t, mats.shape[2]).permute(1, 0, 2, 3)


def _add_member_noise_(
    out4: Tensor, p: Tensor, noise_b: Tensor | None, antithetic: bool, sigma: float
) -> None:
    """``out4 += σ c_r (p + ε_k)`` for ``p`` of ``out4``'s ``(R, n, T, m)`` shape."""
    if noise_b is not None:
        p += noise_b[None, :, None, :]
    out4 += _scale_(p, antithetic, sigma)


def _addmm_scaled(
    x4: Tensor, mat_t: Tensor, out4: Tensor, noise_b: Tensor | None, antithetic: bool, sigma: float
) -> None:
    """``out += σ c_r (x @ mat_t + ε_k)`` using the GEMM's accumulation (no extra pass over the output)."""
    out2 = out4.view(math.prod(out4.shape[:-1]), out4.shape[-1])
    x2 = x4.reshape(math.prod(x4.shape[:-1]), x4.shape[-1])
    reps = out4.shape[0]
    if antithetic and reps > 1:
        half = out2.shape[0] // 2
        out2[:half].addmm_(x2[:half], mat_t, alpha=sigma)
        out2[half:].addmm_(x2[half:], mat_t, alpha=-sigma)
    else:
        out2.addmm_(x2, mat_t, alpha=sigma)
    if noise_b is not None:
        eps = noise_b[None, :, None, :].expand(reps, *noise_b.shape[:1], 1, noise_b.shape[1]).clone()
        out4 += _scale_(eps, antithetic, sigma)


def _conv_base(x, weight, bias, n, antithetic, stride, padding, dilation, groups):
    c = weight.shape[1] * groups
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != c:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D input (repeats * n, {c}, H, W), got shape {shape}")
    if weight.shape[1] == 0:
        raise ValueError(
            "weight: the population conv forwards need at least one input channel per group, got weight of "
            f"shape {tuple(weight.shape)}"
        )
    reps = _repeats(x.shape[0], n, antithetic)
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous()
    return out, x.reshape(reps, n, *x.shape[1:])


def _add_conv_noise_(
    out: Tensor, v: Tensor, noise_b: Tensor | None, antithetic: bool, sigma: float
) -> Tensor:
    """``out += σ c_r (v + ε_k)`` for ``v`` of shape ``(R, n, C_out, H', W')``; returns ``out``."""
    if noise_b is not None:
        v.add_(noise_b[None, :, :, None, None])
    out.view(v.shape).add_(_scale_(v, antithetic, sigma))
    return out
