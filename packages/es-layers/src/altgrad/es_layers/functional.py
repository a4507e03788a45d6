"""The math of every perturbation mode, as small pure functions (one home for each mode).

The perturbed layers (:mod:`altgrad.es_layers.linear`, :mod:`altgrad.es_layers.conv`) and the noise structures
(:mod:`altgrad.es_layers.modes`) call these functions; other packages (``altgrad.zero_order``) can call them with
noise of their own. Nothing here draws random numbers: every function takes the per-member noise as tensors.

**Population layout.** ``n`` population members, ``R`` repeats. The batched input ``x`` has ``R * n`` rows and
**the member index varies fastest**: row ``i`` belongs to member ``i % n`` and repeat ``i // n``. Linear inputs are
``(R * n, *, in_features)`` (any number of middle dimensions), conv inputs ``(R * n, C_in, H, W)``. Every
per-member noise tensor has ``n`` as its first dimension.

**Perturbation.** Member ``k`` in repeat ``r`` computes the layer with weight ``W + c_r σ E_k`` and bias
``b + c_r σ ε_k``, where ``c_r = 1`` except with ``antithetic=True`` and an even ``R > 1``, where repeats
``R/2 ... R-1`` use ``c_r = -1`` (NESgpu's layout). ``σ`` is the ``sigma`` argument (``1.0`` when the noise already
includes the scale, as in the layers). ``ε_k`` is ``noise_b[k]`` (zero when ``noise_b`` is ``None``; it may be given
even when ``bias`` is ``None``).

``E_k`` per mode (``m`` outputs, ``n_in`` inputs, ``kernel`` the conv kernel dims):

| mode | ``E_k`` | noise arguments |
|---|---|---|
| perturbed | ``noise_w[k]`` (dense, IID) | ``noise_w (n, m, n_in, *kernel)`` |
| sparse (Linear only) | zero except columns ``cols[k]``: ``E_k[:, cols[k]] = values[k]`` | ``cols (n, s)`` int64, ``values (n, m, s)`` |
| permuted | ``E_k[ρ_k(i), π_k(j)] = shared[i, j]``, zero elsewhere (``π_k = in_idx[k]``, ``ρ_k = out_idx[k]``; a missing side is the identity) | ``shared (m_sp, n_sp, *kernel)``, ``in_idx (n, n_sp)``, ``out_idx (n, m_sp)`` int64, distinct entries per row |
| flipout | ``diag(out_sign[k]) · shared · diag(in_sign[k])`` (a missing side is all ones) | ``shared (m, n_in/groups, *kernel)``, ``in_sign (n, n_in)``, ``out_sign (n, m)`` |
| lowrank | ``a[k] @ b[k]ᵀ`` reshaped to the weight's shape | ``a (n, m, r)``, ``b (n, n_in·prod(kernel), r)`` |

Each mode has a forward (``<mode>_linear``, ``<mode>_conv2d``), the dense perturbations (``<mode>_dense``,
shape ``(n, *weight.shape)``, for checks) and the ES update ``Σ_k w_k σ E_k`` (``<mode>_weighted_sum``).
The forwards return ``F.linear(x, weight, bias)`` (or ``F.conv2d``) plus the perturbation term, without ever
materialising ``W + σE_k`` (except the IID mode, whose ``E_k`` is dense anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "flipout_conv2d",
    "flipout_dense",
    "flipout_linear",
    "flipout_weighted_sum",
    "inverse_injection",
    "lowrank_conv2d",
    "lowrank_dense",
    "lowrank_linear",
    "lowrank_weighted_sum",
    "permuted_conv2d",
    "permuted_dense",
    "permuted_linear",
    "permuted_weighted_sum",
    "perturbed_affine",
    "perturbed_conv2d",
    "perturbed_dense",
    "perturbed_linear",
    "perturbed_weighted_sum",
    "sparse_dense",
    "sparse_linear",
    "sparse_weighted_sum",
]

# Permuted update: elements per sub-chunk when the members' contributions are scattered directly, and the cost of
# one scattered element update in GEMM multiply-adds (chooses scatter vs. the P = Σ w_k Π_k GEMM).
_SCATTER_ELEMENTS = 1 << 22
_SCATTER_PENALTY = 32

_Size2 = int | Sequence[int]


# ----------------------------------------------------------------------------- checks and shared plumbing
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


def _linear_base(x: Tensor, weight: Tensor, bias: Tensor | None, n: int, antithetic: bool):
    """``out = x Wᵀ + b`` and the ``(R, n, T, ·)`` views of input and output."""
    reps = _linear_repeats(x, weight.shape[1], n, antithetic)
    out = F.linear(x, weight, bias)
    if not out.is_contiguous():
        out = out.contiguous()
    x4 = x.reshape(reps, n, -1, x.shape[-1])
    out4 = out.view(reps, n, -1, weight.shape[0])
    return out, x4, out4


def _bmm_members(x4: Tensor, mats: Tensor, noise_b: Tensor | None) -> Tensor:
    """Per-member ``x_k @ mats_k (+ ε_k)``: ``x4 (R, n, T, k)``, ``mats (n, k, m)`` → ``(R, n, T, m)``."""
    reps, n, t, k = x4.shape
    xm = x4.permute(1, 0, 2, 3).reshape(n, reps * t, k)
    p = torch.bmm(xm, mats) if noise_b is None else torch.baddbmm(noise_b.unsqueeze(1), xm, mats)
    return p.view(n, reps, t, -1).permute(1, 0, 2, 3)


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
    out2 = out4.view(-1, out4.shape[-1])
    x2 = x4.reshape(-1, x4.shape[-1])
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


# ----------------------------------------------------------------------------- IID ("perturbed")
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
    x4 = x.reshape(reps, n, -1, k)
    out4 = out.view(reps, n, -1, m)
    signs = _repeat_signs(reps, antithetic, sigma)
    if x4.stride(0) == 0 and x4.stride(1) == 0:
        _shared_input_linear_(x4[0, 0], weight, bias, noise_w, noise_b, signs, out4)
    elif x4.shape[2] * reps // len(set(signs)) >= _BLOCKED_MIN_ROWS:
        _member_input_linear_(x4, weight, bias, noise_w, noise_b, signs, out4)
    else:
        out2 = out.view(-1, m)
        if bias is None:
            torch.mm(x4.reshape(-1, k), weight.T, out=out2)
        else:
            torch.addmm(bias, x4.reshape(-1, k), weight.T, out=out2)
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


def _conv_base(x, weight, bias, n, antithetic, stride, padding, dilation, groups):
    c = weight.shape[1] * groups
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != c:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D input (repeats * n, {c}, H, W), got shape {shape}")
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


# ----------------------------------------------------------------------------- sparse
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
    contrib = (values * w[:, None, None]).permute(1, 0, 2).reshape(m, -1)
    g = torch.zeros((m, in_features), dtype=values.dtype, device=values.device)
    g.index_add_(1, cols.reshape(-1), contrib)
    return _scale_(g, False, _check_sigma(sigma))


# ----------------------------------------------------------------------------- permuted
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
    v = xg.reshape(-1, n_sp) @ shared.t()  # (R*n*t, m_sp)
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
    g = (q.view(m, m_sp) @ e.reshape(m_sp, -1)).view(*weight_shape)
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
        v = F.pad(v.view(reps, n, m_sp, -1), (0, 0, 0, 1))  # a zero channel at the end
        offsets = out_inv + torch.arange(n, device=x5.device)[:, None] * (m_sp + 1)
        v = v.view(reps, n * (m_sp + 1), -1).index_select(1, offsets.reshape(-1))
    return _add_conv_noise_(out, v.view(reps, n, weight.shape[0], *out_hw), noise_b, antithetic, sigma)


# ----------------------------------------------------------------------------- flipout (sign flips)
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
    p = (xs.reshape(-1, weight.shape[1]) @ shared.t()).view(out4.shape)
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


# ----------------------------------------------------------------------------- low rank (EGGROLL)
def _lowrank_checks(weight, a, b, noise_b):
    m = weight.shape[0]
    n = a.shape[0] if isinstance(a, Tensor) and a.dim() == 3 else None
    _check_noise("a", a, (n, m, None))
    n, _, r = a.shape  # checked: (n, m, r)
    _check_noise("b", b, (n, weight[0].numel(), r))
    _check_noise("noise_b", noise_b, (n, m))
    return n, r


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
    m, k_in = weight.shape
    n, _ = _lowrank_checks(weight, a, b, noise_b)
    sigma = _check_sigma(sigma)
    out, x4, out4 = _linear_base(x, weight, bias, n, antithetic)
    reps, _, t, _ = x4.shape
    h = torch.bmm(x4.permute(1, 0, 2, 3).reshape(n, reps * t, k_in), b)  # (n, R*t, r)
    a_t = a.transpose(1, 2)
    p = torch.bmm(h, a_t) if noise_b is None else torch.baddbmm(noise_b.unsqueeze(1), h, a_t)
    out4 += _scale_(p.view(n, reps, t, m).permute(1, 0, 2, 3), antithetic, sigma)
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
    g = (aw @ b.transpose(1, 2).reshape(k * r, -1)).view(*weight_shape)
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
