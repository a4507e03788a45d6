"""Validation and normalisation of the arguments shared by every entry point."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ScanArgs:
    """Arguments of one scan after validation.

    Attributes:
        x: The input, a floating tensor with at least one dimension.
        gamma: ``None`` for a Python-number discount, else a tensor broadcastable to ``x`` (per-row discounts
            already have their scan dimension re-inserted).
        gamma_value: The discount when ``gamma`` is ``None``.
        dones: ``None`` or a bool tensor broadcastable to ``x``.
        initial: ``None`` or a tensor broadcastable to ``x`` with the scan dimension removed.
        dim: The scan dimension, non-negative.
        squeeze: True when ``x`` was 0-d and was viewed as a 1-element vector.
    """

    x: torch.Tensor
    gamma: torch.Tensor | None
    gamma_value: float
    dones: torch.Tensor | None
    initial: torch.Tensor | None
    dim: int
    squeeze: bool


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Returns the accumulation dtype for an input dtype (float64 stays float64, the rest use float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _broadcastable(shape: torch.Size, target: torch.Size) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if t.device == x.device:
        return t
    if t.device.type == "cpu" and t.dim() == 0:
        return t.to(x.device)  # a 0-d CPU tensor acts like a Python number, as in torch's own ops
    raise ValueError(f"`{name}` is on {t.device} but `x` is on {x.device}; move them to the same device")


def normalize(
    x: torch.Tensor,
    gamma: float | torch.Tensor,
    dim: int = -1,
    dones: torch.Tensor | None = None,
    initial: float | torch.Tensor | None = None,
) -> ScanArgs:
    """Validates the arguments of a discounted cumsum and brings them into the form the op expects.

    Args:
        x: Values to sum.
        gamma: Discount: a number, a 0-d tensor, a per-row tensor (shape of ``x`` without ``dim``) or a tensor
            broadcastable to ``x``.
        dim: Dimension to scan along.
        dones: Optional resets, broadcastable to ``x``.
        initial: Optional value before the first element in scan order, a number or a tensor broadcastable to
            the shape of ``x`` without ``dim``.

    Returns:
        The normalised arguments.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If shapes do not match or tensors live on different devices.
        IndexError: If ``dim`` is out of range.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"`x` must be float16, bfloat16, float32 or float64, got {x.dtype}")
    squeeze = x.dim() == 0
    if squeeze:
        x = x.reshape(1)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"`dim` must be an int, got {type(dim).__name__}")
    ndim = x.dim()
    if not -ndim <= dim < ndim:
        raise IndexError(f"`dim` is {dim} but `x` has {ndim} dimension(s) (valid: {-ndim} to {ndim - 1})")
    dim = dim % ndim
    row_shape = x.shape[:dim] + x.shape[dim + 1 :]

    gamma_t: torch.Tensor | None = None
    gamma_value = 0.0
    if isinstance(gamma, torch.Tensor):
        if gamma.dtype.is_complex or gamma.dtype == torch.bool:
            raise TypeError(f"`gamma` must be a real floating tensor, got {gamma.dtype}")
        gamma = _check_device("gamma", gamma, x)
        if not gamma.dtype.is_floating_point:
            gamma = gamma.to(compute_dtype(x.dtype))
        if gamma.dim() == ndim - 1 and ndim > 1 and gamma.shape == row_shape:
            gamma = gamma.unsqueeze(dim)  # one discount per row (the peer's [B] discount for a [B, N] input)
        elif not _broadcastable(gamma.shape, x.shape):
            raise ValueError(
                f"`gamma` of shape {tuple(gamma.shape)} does not broadcast to `x` of shape {tuple(x.shape)} "
                f"and is not per-row (expected {tuple(row_shape)})"
            )
        gamma_t = gamma
    elif isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):  # also numpy scalars
        gamma_value = float(gamma)
    else:
        raise TypeError(f"`gamma` must be a float or a tensor, got {type(gamma).__name__}")

    dones_t: torch.Tensor | None = None
    if dones is not None:
        if not isinstance(dones, torch.Tensor):
            raise TypeError(f"`dones` must be a tensor or None, got {type(dones).__name__}")
        if dones.dtype.is_complex:
            raise TypeError(f"`dones` must be a bool, integer or float tensor, got {dones.dtype}")
        dones = _check_device("dones", dones, x)
        if not _broadcastable(dones.shape, x.shape):
            raise ValueError(
                f"`dones` of shape {tuple(dones.shape)} does not broadcast to `x` of shape {tuple(x.shape)}"
            )
        dones_t = dones if dones.dtype == torch.bool else dones != 0

    initial_t: torch.Tensor | None = None
    if initial is not None:
        if isinstance(initial, numbers.Real) and not isinstance(initial, bool):
            # 0-d: it broadcasts, and an empty x with a huge row shape allocates nothing
            initial_t = torch.tensor(float(initial), dtype=compute_dtype(x.dtype), device=x.device)
        elif isinstance(initial, torch.Tensor):
            if not (initial.dtype.is_floating_point or initial.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"`initial` must be a real tensor, got {initial.dtype}")
            initial = _check_device("initial", initial, x)
            if not initial.dtype.is_floating_point:
                initial = initial.to(compute_dtype(x.dtype))
            if not _broadcastable(initial.shape, row_shape):
                raise ValueError(
                    f"`initial` of shape {tuple(initial.shape)} does not broadcast to the shape of `x` without "
                    f"`dim`, {tuple(row_shape)}"
                )
            initial_t = initial
        else:
            raise TypeError(f"`initial` must be a float, a tensor or None, got {type(initial).__name__}")
    return ScanArgs(x, gamma_t, gamma_value, dones_t, initial_t, dim, squeeze)
