"""The two optimizer entry points of the TorchOpt tutorial: functional ``adam`` and ``Adam``.

``adam(lr)`` follows TorchOpt's functional (optax-style) API: ``state = opt.init(params)``, then
``updates, state = opt.update(grads, state)`` and ``params = apply_updates(params, updates)``. The maths is
torch.optim.Adam's (bias-corrected moments, ``eps`` added to the root of the second moment), which is also
TorchOpt's with ``eps_root=0``. ``Adam`` is `Adam`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["Adam", "GradientTransformation", "adam", "apply_updates"]

#: TorchOpt's ``torchopt.Adam`` is an ordinary ``torch.optim``-style Adam.
Adam = torch.optim.Adam


class _AdamState(NamedTuple):
    step: int
    mu: Any
    nu: Any


class GradientTransformation(NamedTuple):
    """A functional optimizer: ``init(params) -> state`` and ``update(updates, state, ...) -> (updates, state)``.

    Attributes:
        init: Builds the optimizer state for a pytree of parameters.
        update: Turns gradients into parameter updates and a new state.
    """

    init: Any
    update: Any


def adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Functional Adam (``torchopt.adam``) for pytrees of tensors.

    Args:
        lr: Learning rate.
        betas: Decay rates of the first and second moments.
        eps: Term added to the square root of the second moment.
        weight_decay: L2 penalty added to the gradient.
        maximize: Ascend instead of descend.

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: For a negative ``lr``, ``eps`` or ``weight_decay``, or betas outside ``[0, 1)``.
    """
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(f"`lr`, `eps` and `weight_decay` must be >= 0, got {lr}, {eps}, {weight_decay}")
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"`betas` must be in [0, 1), got {betas}")

    def init(params: Any) -> _AdamState:
        zeros = pytree.tree_map(lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params)
        return _AdamState(0, zeros, pytree.tree_map(torch.zeros_like, params))

    def update(
        updates: Any, state: _AdamState, *, params: Any = None, inplace: bool = True
    ) -> tuple[Any, Any]:
        del inplace
        grads = updates
        if maximize:
            grads = pytree.tree_map(torch.neg, grads)
        if weight_decay:
            if params is None:
                raise ValueError("`params` are required for weight decay")
            grads = pytree.tree_map(lambda g, p: g + weight_decay * p.detach(), grads, params)
        count = state.step + 1
        mu = pytree.tree_map(lambda m, g: torch.lerp(m, g.detach(), 1 - b1), state.mu, grads)
        nu = pytree.tree_map(lambda v, g: v * b2 + (1 - b2) * g.detach() ** 2, state.nu, grads)
        bc1, bc2 = 1 - b1**count, 1 - b2**count

        def step(m: Tensor, v: Tensor) -> Tensor:
            return -lr * (m / bc1) / ((v / bc2).sqrt() + eps)

        return pytree.tree_map(step, mu, nu), _AdamState(count, mu, nu)

    return GradientTransformation(init, update)


def apply_updates(params: Any, updates: Any, *, inplace: bool = True) -> Any:
    """Add ``updates`` to ``params`` (``torchopt.apply_updates``).

    Args:
        params: Pytree of parameter tensors.
        updates: Pytree of updates with the same structure (``None`` leaves are skipped).
        inplace: Update the tensors' data in place (TorchOpt's default) instead of returning new tensors.

    Returns:
        The updated parameters, with the structure of ``params``.
    """
    if inplace:

        def add(p: Tensor, u: Tensor | None) -> Tensor:
            if u is not None:
                p.data.add_(u)
            return p

    else:

        def add(p: Tensor, u: Tensor | None) -> Tensor:
            return p.add(u) if u is not None else p

    return pytree.tree_map(add, params, updates)
