"""The public discounted-cumsum functions."""

from __future__ import annotations

import torch

from . import _ops
from ._args import normalize


def discounted_cumsum(
    x: torch.Tensor,
    gamma: float | torch.Tensor,
    dim: int = -1,
    reverse: bool = False,
    dones: torch.Tensor | None = None,
    initial: float | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Discounted cumulative sum of ``x`` along ``dim``, differentiable w.r.t. ``x``, ``gamma`` and ``initial``.

    With ``reverse=False`` (sum to the left) $y_t = x_t + \gamma_t (1 - d_t)\, y_{t-1}$, with
    ``reverse=True`` (sum to the right, the RL return) $y_t = x_t + \gamma_t (1 - d_t)\, y_{t+1}$. The value
    before the first element in scan order is ``initial`` (0 when omitted), so with ``reverse=True`` it is the
    bootstrap value $y_N$.

    Runs the C++ kernel on the CPU (SIMD, multi-threaded), the CUDA kernel on CUDA devices (one launch on the
    current stream) and a pure-torch loop on any other device. float16 and bfloat16 are accumulated in float32.
    Registered as the custom op ``torch.ops.altgrad_discounted_cumsum.scan``, so it works under
    ``torch.compile(fullgraph=True)``.

    Args:
        x: Values to sum: float16, bfloat16, float32 or float64, any shape, any strides.
        gamma: Discount factor. A Python number or 0-d tensor (one discount), a tensor with the shape of ``x``
            without ``dim`` (one discount per row, e.g. ``[B]`` for ``x`` of shape ``[B, N]``), or any tensor
            broadcastable to ``x`` (per-step or per-element discounts). When a tensor's shape fits both rules, the
            per-row reading wins.
        dim: Dimension to scan along.
        reverse: If True, sum to the right (future elements are discounted into the present).
        dones: Optional episode resets, a tensor broadcastable to ``x`` (bool, or numbers where non-zero means
            True). Where ``dones[t]`` is True, ``y[t]`` receives nothing from the element before it in scan order,
            i.e. from ``y[t+1]`` when ``reverse=True`` (the episode ended at step ``t``) and from ``y[t-1]`` when
            ``reverse=False`` (an episode starts at step ``t``). A discount of exactly 0 cuts the same way. A cut
            selects ``y[t] = x[t]``: a NaN or inf before it never reaches it (no ``0 * inf``), on every device and
            thread count.
        initial: Optional value before the first element in scan order (the bootstrap value when
            ``reverse=True``): a number or a tensor broadcastable to the shape of ``x`` without ``dim``.

    Returns:
        A new tensor with the shape and dtype of ``x``.

    Raises:
        TypeError: If ``x`` is not a floating tensor or another argument has the wrong type.
        ValueError: If ``gamma``, ``dones`` or ``initial`` do not fit the shape of ``x`` or live on another device.
        IndexError: If ``dim`` is out of range.
        RuntimeError: If ``x`` is on a CUDA device and the CUDA module was not built.

    Example:
        >>> import torch
        >>> from altgrad.discounted_cumsum import discounted_cumsum
        >>> discounted_cumsum(torch.ones(4), 0.5, reverse=True)
        tensor([1.8750, 1.7500, 1.5000, 1.0000])
    """
    a = normalize(x, gamma, dim, dones, initial)
    fn = _ops.scan_eager if _ops.can_skip_dispatcher(a.x, a.gamma, a.dones, a.initial) else _ops.scan
    y = fn(a.x, a.gamma, a.gamma_value, a.dones, a.initial, a.dim, reverse)
    return y.reshape(()) if a.squeeze else y


def _peer_gamma(x: torch.Tensor, gamma: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(gamma, (list, tuple)):  # the peer accepts anything torch.tensor() takes
        gamma = torch.tensor(
            gamma, dtype=torch.float64, device=x.device if isinstance(x, torch.Tensor) else None
        )
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"`x` must be a 2-D tensor [B, N] (use discounted_cumsum for other shapes), got {shape}"
        )
    if isinstance(gamma, torch.Tensor) and gamma.dim() == 1:
        if gamma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"`gamma` must have 1 or B={x.shape[0]} elements, got {gamma.shape[0]}")
        return gamma.reshape(-1, 1)
    return gamma


def discounted_cumsum_right(input: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    r"""Discounted cumulative sum to the right of each position: $y_t = x_t + \gamma\, y_{t+1}$.

    Drop-in replacement for ``torch_discounted_cumsum.discounted_cumsum_right``: ``input`` is ``[B, N]`` and the sum
    runs along dim 1. Use [`discounted_cumsum`][altgrad.discounted_cumsum.discounted_cumsum] for other shapes,
    resets or an initial value.

    Args:
        input: A ``[B, N]`` floating tensor (named as in the peer, so ``input=`` keywords keep working).
        gamma: A number, a 0-d tensor, or a 1-D tensor (or list) with 1 or ``B`` elements (one discount per row).

    Returns:
        A ``[B, N]`` tensor like ``input``.

    Raises:
        ValueError: If ``input`` is not 2-D or ``gamma`` has the wrong number of elements.

    Example:
        >>> import torch
        >>> discounted_cumsum_right(torch.ones(1, 3), 0.5)
        tensor([[1.7500, 1.5000, 1.0000]])
    """
    return discounted_cumsum(input, _peer_gamma(input, gamma), dim=1, reverse=True)


def discounted_cumsum_left(input: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    r"""Discounted cumulative sum to the left of each position: $y_t = x_t + \gamma\, y_{t-1}$.

    Drop-in replacement for ``torch_discounted_cumsum.discounted_cumsum_left`` (``input`` is ``[B, N]``, the sum
    runs along dim 1).

    Args:
        input: A ``[B, N]`` floating tensor.
        gamma: A number, a 0-d tensor, or a 1-D tensor (or list) with 1 or ``B`` elements (one discount per row).

    Returns:
        A ``[B, N]`` tensor like ``input``.

    Raises:
        ValueError: If ``input`` is not 2-D or ``gamma`` has the wrong number of elements.

    Example:
        >>> import torch
        >>> discounted_cumsum_left(torch.ones(1, 3), 0.5)
        tensor([[1.0000, 1.5000, 1.7500]])
    """
    return discounted_cumsum(input, _peer_gamma(input, gamma), dim=1, reverse=False)
