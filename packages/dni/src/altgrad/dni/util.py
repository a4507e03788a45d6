"""pytorch-dni's small helpers, for code that imports them from ``dni``."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["detach_all", "get_padding"]


def get_padding(input_dim: int, kernel_size: int, dilation: int, stride: int) -> int:
    """pytorch-dni's ``get_padding``: ``floor((input_dim·stride + (kernel_size − 1)·dilation + 1) / 2)``.

    Kept with pytorch-dni's formula so that code ported from it builds the same layers. **It is not the
    padding that preserves resolution** (for ``input_dim=28, kernel_size=5, dilation=1, stride=1`` it gives 16,
    and a 5×5 convolution then outputs 56×56). For resolution-preserving convolutions use ``padding="same"``
    (what :class:`~altgrad.dni.Conv2dDNI` does), or ``dilation·(kernel_size − 1) // 2`` for odd kernels.

    Args:
        input_dim: Spatial size of the input.
        kernel_size: Convolution kernel size.
        dilation: Convolution dilation.
        stride: Convolution stride.

    Returns:
        pytorch-dni's padding value.
    """
    for name, value in (
        ("input_dim", input_dim),
        ("kernel_size", kernel_size),
        ("dilation", dilation),
        ("stride", stride),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "input_dim" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'input_dim' else 1}, got {value!r}")
    return math.floor((input_dim * stride + (kernel_size - 1) * dilation + 1) / 2)


def detach_all(value: Any) -> Any:
    """Detach every tensor inside nested lists, tuples, sets and dicts (pytorch-dni's ``detach_all``).

    Args:
        value: A tensor or a container of them; other values are returned unchanged.

    Returns:
        The same structure with detached tensors.
    """
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return type(value)((k, detach_all(v)) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return type(value)(detach_all(v) for v in value)
    return value
