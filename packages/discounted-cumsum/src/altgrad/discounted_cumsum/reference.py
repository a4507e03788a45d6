r"""The pure-torch reference: the definition of the discounted cumulative sum, one step at a time.

Along ``dim`` (length N), with discounts gamma_t, resets d_t and an initial value y_init (0 when absent):

    forward (left):   y_t = x_t + gamma_t * (1 - d_t) * y_{t-1},   y_{-1} = y_init
    reverse (right):  y_t = x_t + gamma_t * (1 - d_t) * y_{t+1},   y_N    = y_init

A reset $d_t = 1$ (or a discount of exactly 0) means that $y_t$ receives nothing from the element before it in
scan order: $y_t = x_t$ even when that element is NaN or infinite (no $0 \cdot \infty$).
This module is the test oracle for the native kernels and the implementation used on devices that have no
native kernel. It is differentiable through ordinary autograd.
"""

from __future__ import annotations

import torch

from ._args import compute_dtype, normalize


def scan_reference(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    gamma_value: float,
    dones: torch.Tensor | None,
    initial: torch.Tensor | None,
    dim: int,
    reverse: bool,
) -> torch.Tensor:
    """Runs the recurrence with a Python loop over ``dim`` on already-normalised arguments.

    Args:
        x: Values, any floating dtype (half types are accumulated in float32).
        gamma: Discount tensor broadcastable to ``x``, or ``None`` to use ``gamma_value``.
        gamma_value: Discount used when ``gamma`` is ``None``.
        dones: Bool resets broadcastable to ``x``, or ``None``.
        initial: Value before the first element in scan order, broadcastable to ``x`` without ``dim``, or ``None``.
        dim: Non-negative scan dimension.
        reverse: Scan from the end (right) instead of from the start (left).

    Returns:
        The discounted cumulative sum, same shape and dtype as ``x``.
    """
    n = x.shape[dim]
    if x.numel() == 0:
        return torch.empty_like(x)
    cd = compute_dtype(x.dtype)
    xs = x.to(cd).movedim(dim, 0)
    a = (gamma.to(cd) if gamma is not None else torch.tensor(gamma_value, dtype=cd, device=x.device)).expand(
        x.shape
    )
    if dones is not None:
        a = torch.where(dones.expand(x.shape), torch.zeros((), dtype=cd, device=x.device), a)
    a = a.movedim(dim, 0)
    prev = None if initial is None else initial.to(cd).expand(xs.shape[1:])
    out: list[torch.Tensor] = [xs[0]] * n
    order = range(n - 1, -1, -1) if reverse else range(n)
    for t in order:
        if prev is not None:
            # A zero gate cuts: a non-finite prev is replaced by 0 there (0 * inf would be NaN), while the
            # derivative w.r.t. the gate stays prev wherever prev is finite.
            prev = torch.where(
                (a[t] == 0) & ~prev.isfinite(), torch.zeros((), dtype=cd, device=x.device), prev
            )
        prev = xs[t] if prev is None else xs[t] + a[t] * prev
        out[t] = prev
    return torch.stack(out, 0).movedim(0, dim).to(x.dtype)


def discounted_cumsum_reference(
    x: torch.Tensor,
    gamma: float | torch.Tensor,
    dim: int = -1,
    reverse: bool = False,
    dones: torch.Tensor | None = None,
    initial: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The discounted cumulative sum computed by a plain loop (slow; for tests and for checking results).

    Takes exactly the arguments of [`discounted_cumsum`][altgrad.discounted_cumsum.discounted_cumsum] and
    returns the same values up to rounding.

    Args:
        x: Values to sum, float16, bfloat16, float32 or float64.
        gamma: Discount: a number, a 0-d tensor, a per-row tensor or a tensor broadcastable to ``x``.
        dim: Dimension to scan along.
        reverse: If True, sum to the right (``y[t] = x[t] + gamma * y[t+1]``).
        dones: Optional resets broadcastable to ``x``.
        initial: Optional value before the first element in scan order.

    Returns:
        A tensor like ``x``.

    Example:
        >>> import torch
        >>> discounted_cumsum_reference(torch.ones(3), 0.5)
        tensor([1.0000, 1.5000, 1.7500])
    """
    a = normalize(x, gamma, dim, dones, initial)
    y = scan_reference(a.x, a.gamma, a.gamma_value, a.dones, a.initial, a.dim, reverse)
    return y.reshape(()) if a.squeeze else y
