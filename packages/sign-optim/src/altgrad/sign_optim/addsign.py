"""The AddSign optimizer (Bello et al., 2017; TensorFlow's ``AddSignOptimizer``)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._functional import Rule
from ._optimizer import DecayArg, SignOptimizer

__all__ = ["AddSign"]


class AddSign(SignOptimizer):
    r"""AddSign: ``p <- p - lr * (alpha + d * sign(g) * sign(m)) * g``.

    For every parameter with a gradient, at its t-th step (t = 1, 2, ...)::

        g <- -g                          if maximize
        g <- g + weight_decay * p        (or p <- p * (1 - lr * weight_decay) if decoupled)
        m <- beta * m + (1 - beta) * g   (m starts at 0 and is updated first)
        d <- sign_internal_decay(t - 1)  (1 if None)
        p <- p - lr * (alpha + d * sign(g) * sign(m)) * g

    This is exactly TensorFlow's ``tf.contrib.opt.AddSignOptimizer`` / ``ApplyAddSign``: the sign of
    the *new* ``m``, ``sign(0) = 0`` and the decay evaluated before the step counter is incremented.
    With ``alpha=1`` and no decay, a coordinate whose gradient disagrees with ``m`` does not move at
    all; with ``alpha < 1`` it moves along ``m`` (against ``-g``).

    Sparse COO gradients (``nn.Embedding(sparse=True)``) follow TensorFlow's ``_apply_sparse``:
    duplicate indices are summed first, ``m`` decays on every row, and only the touched rows of the
    parameter are written. ``weight_decay``, ``differentiable`` and ``capturable`` are refused for
    them with a ``RuntimeError`` at ``step()``.

    The step counter ``t`` is kept per parameter (a 0-dim tensor, as in `torch.optim.Adam`).
    It equals TensorFlow's global step as long as every parameter receives a gradient at every step;
    a parameter that skips steps (``grad is None``) keeps its own count for the decay.

    Args:
        params: Iterable of parameters (or named parameters) to optimize, or of dicts defining
            parameter groups.
        lr: Learning rate, a float or a 1-element tensor (a tensor needs ``capturable=True`` with
            ``foreach=True``); >= 0. TensorFlow's default is 0.1; this package uses 1e-3 like
            cydonia999's PyTorch port.
        beta: Coefficient of the running average ``m`` of the gradient; 0 <= beta < 1.
        alpha: The additive term of the multiplier ``alpha + d * sign(g) * sign(m)``; any real number.
        sign_internal_decay: The internal decay ``d``: None (``d = 1``), a
            [`LinearInternalDecay`][altgrad.sign_optim.LinearInternalDecay],
            [`CosineInternalDecay`][altgrad.sign_optim.CosineInternalDecay] or
            [`RestartCosineInternalDecay`][altgrad.sign_optim.RestartCosineInternalDecay] (stored as
            plain data in the param group, so it is saved by ``state_dict()``), or any callable
            ``f(step)`` returning a float. A plain callable is **not** saved in ``state_dict()``: pass
            it again when you rebuild the optimizer before ``load_state_dict()``. Under
            ``torch.compile`` or ``capturable=True`` a callable receives a 0-dim tensor.
        weight_decay: L2 penalty coefficient; >= 0.
        decoupled_weight_decay: If True, shrink the parameters by ``1 - lr * weight_decay`` (AdamW
            style) instead of adding ``weight_decay * p`` to the gradient (which then also enters ``m``
            and the signs).
        maximize: Maximize the objective instead of minimizing it (``p.grad`` is never modified).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation. None picks it when all
            parameters are on CUDA/XPU. Both implementations give bit-identical results.
        capturable: Keep the step counters and the decay on the parameters' device, so the step can be
            captured in a CUDA graph.
        differentiable: Let autograd record the step (single-tensor implementation only).

    Raises:
        TypeError: If an argument has the wrong type (for example a non-callable ``sign_internal_decay``).
        ValueError: If ``lr < 0``, ``beta`` is outside [0, 1) or ``weight_decay < 0``.

    Examples:
        >>> import torch
        >>> from altgrad.sign_optim import AddSign, LinearInternalDecay
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = AddSign([w], lr=0.1, sign_internal_decay=LinearInternalDecay(10))
        >>> w.grad = torch.tensor([0.1, 0.1])
        >>> opt.step()
        >>> w.detach()
        tensor([0.9800, 1.9800])
    """

    _rule: ClassVar[Rule] = "add"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        beta: float = 0.9,
        alpha: float = 1,
        sign_internal_decay: DecayArg = None,
        *,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            beta,
            alpha,
            sign_internal_decay,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
        )
