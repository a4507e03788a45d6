"""dni-pytorch compatibility: ``import altgrad.dni.compat as dni`` gives koz4k/dni-pytorch's API.

The names, signatures and semantics of `koz4k/dni-pytorch <https://github.com/koz4k/dni-pytorch>`_ (its
``dni.py``), re-implemented for current PyTorch:

* :class:`BackwardInterface` (update unlocking): ``forward(trigger)`` back-propagates the synthetic gradient
  from ``trigger`` at once and returns a detached copy whose incoming gradient trains the synthesizer;
  ``backward(trigger, factor=1)`` and ``make_trigger(trigger)`` are the two halves (truncated BPTT).
* :class:`ForwardInterface` (synthetic inputs, forward unlocking) and :class:`BidirectionalInterface` (both:
  the complete unlock).
* :class:`BasicSynthesizer`, the context managers :func:`synthesizer_context` (cDNI) and
  :func:`defer_backward`, and :func:`backward`.

Differences from dni-pytorch (all deliberate; see the compatibility table in the docs):

* :class:`BasicSynthesizer` zero-initialises the bias of its last layer too (the paper; dni-pytorch zeroed
  only the weights), so a fresh synthesizer predicts exactly zero.
* The ``defer_backward`` / context state is per thread (dni-pytorch kept it in class attributes shared by all
  threads), and :func:`synthesizer_context` pops its context even when the block raises.
* The interfaces' methods run eagerly under ``torch.compile`` (a graph break).

The synthesizer loss is dni-pytorch's: ``‖ŝ − g‖² / B`` with ``B`` the size of the trigger's first dimension
(summed over everything else), handed to the synthesizer as the gradient ``2 (ŝ − g) / B``. Forward
synthesizers are trained with ``F.mse_loss`` (mean over all elements), as in dni-pytorch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BackwardInterface",
    "BasicSynthesizer",
    "BidirectionalInterface",
    "ForwardInterface",
    "UnidirectionalInterface",
    "backward",
    "defer_backward",
    "synthesizer_context",
]


class _State(threading.local):
    """Per-thread state of :func:`defer_backward` and :func:`synthesizer_context`."""

    def __init__(self) -> None:
        self.deferring = False
        self.deferred: list[tuple[Tensor, Tensor]] = []
        self.contexts: list[Any] = []


_STATE = _State()


def _context() -> Any:
    return _STATE.contexts[-1] if _STATE.contexts else None


def backward(variable: Tensor, gradient: Tensor | None = None) -> None:
    """Back-propagate ``gradient`` from ``variable`` now, or at the end of the enclosing :func:`defer_backward`.

    Args:
        variable: The tensor to back-propagate from.
        gradient: Its gradient; ``None`` means ones (``variable``'s shape), as for a scalar loss.
    """
    if not isinstance(variable, Tensor):
        raise TypeError(f"variable must be a Tensor, got {type(variable).__name__}")
    if gradient is None:
        gradient = torch.ones_like(variable)
    elif not isinstance(gradient, Tensor) or gradient.shape != variable.shape:
        got = tuple(gradient.shape) if isinstance(gradient, Tensor) else type(gradient).__name__
        raise ValueError(f"gradient must be a Tensor of variable's shape {tuple(variable.shape)}, got {got}")
    if _STATE.deferring:
        _STATE.deferred.append((variable, gradient))
    else:
        torch.autograd.backward(variable, gradient)


@contextlib.contextmanager
def defer_backward() -> Iterator[None]:
    """Collect every :func:`backward` call in the block and run them as one ``torch.autograd.backward``.

    Needed when real and synthetic gradients go through the same graph (an RNN window: the loss and the
    synthetic gradient injected at the window end). Cannot be nested. Nothing is back-propagated if the block
    raises.

    Yields:
        Nothing.
    """
    if _STATE.deferring:
        raise RuntimeError("defer_backward() cannot be nested")
    _STATE.deferring = True
    try:
        yield
        if _STATE.deferred:
            tensors, grads = zip(*_STATE.deferred, strict=True)
            torch.autograd.backward(list(tensors), list(grads))
    finally:
        _STATE.deferring = False
        _STATE.deferred = []


@contextlib.contextmanager
def synthesizer_context(context: Any) -> Iterator[None]:
    """Pass ``context`` (for example one-hot labels, cDNI) to every synthesizer call in the block.

    Scopes can be nested; the innermost context wins.

    Args:
        context: The value synthesizers receive as their second argument.

    Yields:
        Nothing.
    """
    _STATE.contexts.append(context)
    try:
        yield
    finally:
        _STATE.contexts.pop()


class UnidirectionalInterface(nn.Module):
    """An interface that synthesizes ``messages`` from a ``trigger`` (dni-pytorch's base class).

    Args:
        synthesizer: Module called as ``synthesizer(trigger, context)``.
    """

    def __init__(self, synthesizer: nn.Module) -> None:
        super().__init__()
        if not isinstance(synthesizer, nn.Module):
            raise TypeError(f"synthesizer must be an nn.Module, got {type(synthesizer).__name__}")
        self.synthesizer = synthesizer

    def receive(self, trigger: Tensor) -> Tensor:
        """The synthesized message for ``trigger``, detached (no gradient flows through it).

        Args:
            trigger: The synthesizer's input.

        Returns:
            The detached synthetic message.
        """
        return self.synthesizer(trigger, _context()).detach()

    def send(self, message: Tensor, trigger: Tensor) -> None:
        """Train the synthesizer to produce ``message`` from ``trigger`` (MSE; ``trigger`` is detached).

        The loss is back-propagated into the synthesizer's parameters through :func:`backward` (deferred inside
        :func:`defer_backward`); step them with your optimizer.

        Args:
            message: The true message (detached as the regression target).
            trigger: The synthesizer's input.
        """
        synthetic = self.synthesizer(trigger.detach(), _context())
        backward(F.mse_loss(synthetic, message.detach()))


class ForwardInterface(UnidirectionalInterface):
    """Synthetic messages in the forward pass (forward unlocking); no gradient passes through it.

    Args:
        synthesizer: Module called as ``synthesizer(trigger, context)`` that predicts the message.
    """

    @torch.compiler.disable
    def forward(self, message: Tensor, trigger: Tensor) -> Tensor:
        """In training mode, train on ``message`` and return the synthetic message; else return ``message``.

        Args:
            message: The true message.
            trigger: The synthesizer's input.

        Returns:
            The synthetic message (training) or ``message`` (eval).
        """
        if not self.training:
            return message
        self.send(message, trigger)
        return self.receive(trigger)


class _SyntheticGradientUpdater(torch.autograd.Function):
    """Identity on ``trigger``; its backward hands ``2 (ŝ − g) / B`` to the synthesizer and ``g`` on."""

    @staticmethod
    def forward(ctx: Any, trigger: Tensor, synthetic_gradient: Tensor) -> Tensor:  # type: ignore[override]
        if not ctx.needs_input_grad[1]:
            raise ValueError(
                "make_trigger: the synthesizer's output does not require grad (is it frozen, or called under "
                "torch.no_grad()?), so the synthesizer cannot be trained"
            )
        ctx.save_for_backward(synthetic_gradient)
        return trigger.clone()

    @staticmethod
    def backward(ctx: Any, true_gradient: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        (synthetic_gradient,) = ctx.saved_tensors
        batch_size = synthetic_gradient.shape[0] if synthetic_gradient.dim() else 1
        return true_gradient, (synthetic_gradient - true_gradient) * (2.0 / batch_size)


class BackwardInterface(UnidirectionalInterface):
    """Synthetic gradients (update unlocking).

    Args:
        synthesizer: Module called as ``synthesizer(trigger, context)`` that predicts ``∂L/∂trigger``.
    """

    @torch.compiler.disable
    def forward(self, trigger: Tensor) -> Tensor:
        """Back-propagate the synthetic gradient from ``trigger`` and return a detached, tapped copy.

        In training mode: :meth:`backward` (the block below ``trigger`` gets its gradient now), then
        :meth:`make_trigger` on ``trigger.detach()`` (the gradient arriving later trains the synthesizer and
        stops there). In eval mode: ``trigger`` itself.

        Args:
            trigger: The activation.

        Returns:
            A tensor equal to ``trigger``.
        """
        if not self.training:
            return trigger
        self.backward(trigger)
        return self.make_trigger(trigger.detach())

    @torch.compiler.disable
    def backward(self, trigger: Tensor, factor: float = 1) -> None:  # type: ignore[override]
        """Back-propagate ``factor · ŝ`` (``ŝ`` = the synthetic gradient for ``trigger``) from ``trigger``.

        Deferred inside :func:`defer_backward`. A no-op in eval mode.

        Args:
            trigger: The activation to compute the synthetic gradient for and back-propagate it from.
            factor: Scale of the synthetic gradient (the paper uses 0.1 at an RNN window end).
        """
        if not self.training:
            return
        backward(trigger, self.receive(trigger) * factor)

    @torch.compiler.disable
    def make_trigger(self, trigger: Tensor) -> Tensor:
        """Return a copy of ``trigger`` whose incoming gradient trains the synthesizer.

        The gradient passes on to ``trigger`` unchanged (if ``trigger`` requires grad). In eval mode:
        ``trigger`` itself.

        Args:
            trigger: The tensor to tap (for an RNN: the state at the window start).

        Returns:
            A tensor equal to ``trigger``.
        """
        if not self.training:
            return trigger
        return _SyntheticGradientUpdater.apply(trigger, self.synthesizer(trigger.detach(), _context()))


class BidirectionalInterface(nn.Module):
    """Synthetic messages and synthetic gradients (the complete unlock).

    Args:
        forward_synthesizer: Predicts the message from the trigger.
        backward_synthesizer: Predicts the gradient with respect to the message.
    """

    def __init__(self, forward_synthesizer: nn.Module, backward_synthesizer: nn.Module) -> None:
        super().__init__()
        self.forward_interface = ForwardInterface(forward_synthesizer)
        self.backward_interface = BackwardInterface(backward_synthesizer)

    @torch.compiler.disable
    def forward(self, message: Tensor, trigger: Tensor) -> Tensor:
        """:meth:`send` then :meth:`receive` in training mode; ``message`` in eval mode.

        Args:
            message: The true message (the activation of the part below).
            trigger: The forward synthesizer's input (for example the network input).

        Returns:
            The synthetic message with a synthetic-gradient tap (training) or ``message`` (eval).
        """
        if not self.training:
            return message
        self.send(message, trigger)
        return self.receive(trigger)

    def receive(self, trigger: Tensor) -> Tensor:
        """The synthetic message for ``trigger``, tapped so that its incoming gradient trains the synthesizer.

        Args:
            trigger: The forward synthesizer's input.

        Returns:
            The synthetic message.
        """
        return self.backward_interface.make_trigger(self.forward_interface.receive(trigger))

    def send(self, message: Tensor, trigger: Tensor) -> None:
        """Train the forward synthesizer on ``message`` and back-propagate the synthetic gradient from it.

        Args:
            message: The true message (graph-connected to the part below).
            trigger: The forward synthesizer's input.
        """
        self.forward_interface.send(message, trigger)
        self.backward_interface.backward(message)


class BasicSynthesizer(nn.Module):
    """MLP synthesizer: ``Linear(trigger) [+ Linear(context)]``, then ``n_hidden × (ReLU → Linear)``.

    The last layer is zero-initialised (weights and bias), so a fresh synthesizer predicts exactly zero.

    Args:
        output_dim: Size of the synthesized message (or gradient).
        n_hidden: Number of hidden layers.
        hidden_dim: Width of the hidden layers; defaults to ``output_dim``.
        trigger_dim: Size of the trigger; defaults to ``output_dim``.
        context_dim: Size of the context; ``None`` ignores the context.
    """

    def __init__(
        self,
        output_dim: int,
        n_hidden: int = 0,
        hidden_dim: int | None = None,
        trigger_dim: int | None = None,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("output_dim", output_dim),
            ("hidden_dim", hidden_dim),
            ("trigger_dim", trigger_dim),
            ("context_dim", context_dim),
            ("n_hidden", n_hidden),
        ):
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "n_hidden" else 1)
            ):
                raise ValueError(f"{name} must be an int >= {0 if name == 'n_hidden' else 1}, got {value!r}")
        hidden_dim = output_dim if hidden_dim is None else hidden_dim
        trigger_dim = output_dim if trigger_dim is None else trigger_dim
        first = output_dim if n_hidden == 0 else hidden_dim
        self.input_trigger = nn.Linear(trigger_dim, first)
        self.input_context = nn.Linear(context_dim, first) if context_dim is not None else None
        self.layers = nn.ModuleList(
            nn.Linear(hidden_dim, hidden_dim if i < n_hidden - 1 else output_dim) for i in range(n_hidden)
        )
        last: list[nn.Linear | None] = (
            [cast(nn.Linear, self.layers[-1])] if n_hidden else [self.input_trigger, self.input_context]
        )
        with torch.no_grad():
            for layer in last:
                if layer is not None:
                    layer.weight.zero_()
                    layer.bias.zero_()

    def forward(self, trigger: Tensor, context: Tensor | None = None) -> Tensor:
        """Synthesize a message from ``trigger`` and, if built with ``context_dim``, ``context``.

        Args:
            trigger: ``(batch, trigger_dim)``.
            context: ``(batch, context_dim)``; required when ``context_dim`` was given, ignored otherwise.

        Returns:
            ``(batch, output_dim)``.
        """
        out = self.input_trigger(trigger)
        if self.input_context is not None:
            if context is None:
                raise ValueError(
                    "this BasicSynthesizer has context_dim set: call it inside dni.synthesizer_context(context)"
                )
            out = out + self.input_context(context)
        for layer in self.layers:
            out = layer(F.relu(out))
        return out
