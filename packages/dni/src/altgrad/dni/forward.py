"""Synthetic inputs: forward unlocking and the complete unlock (paper §3.3, dni-pytorch's ForwardInterface).

A :class:`ForwardInterface` predicts an activation ``h`` from an earlier tensor, the *trigger* (typically the
network input): ``ĥ = I(trigger, c)``. The layers above ``h`` can run on ``ĥ`` without waiting for the layers
below (forward unlocking); ``I`` is trained by regression onto the real ``h`` when it is computed.
A :class:`BidirectionalInterface` adds a synthetic gradient (a :class:`~altgrad.dni.BackwardInterface`): the
block below ``h`` is updated from ``M(h)``, the layers above run on ``ĥ``, and the gradient arriving at ``ĥ``
trains ``M``. Every module then trains on (synthetic input, synthetic gradient) pairs: the complete unlock.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._optim import update
from .interface import BackwardInterface, check_mode

__all__ = ["BidirectionalInterface", "ForwardInterface"]


class ForwardInterface(nn.Module):
    """Synthetic input for an activation ``h``, predicted from a trigger (forward unlocking).

    In training mode, ``iface(h, trigger)``

    1. predicts ``ĥ = synthesizer(trigger.detach() [, context])`` (one synthesizer call),
    2. trains the synthesizer on the real ``h``: loss ``‖ĥ − h‖² / B`` (summed over features, averaged over the
       batch, like the synthetic-gradient loss), back-propagated into the synthesizer at once and stepped by
       ``optimizer`` if one is given,
    3. returns ``ĥ`` detached in ``"dni"`` mode (no gradient flows into the block below ``h`` or into the
       trigger), or ``h`` itself in ``"observe"`` mode (warm-up: the synthesizer learns, the network does not
       use it).

    In eval mode and in ``"backprop"`` mode it returns ``h`` and trains nothing.

    Args:
        synthesizer: Maps the trigger (with the context concatenated along ``feature_dim``) to a tensor of
            ``h``'s shape; called as ``synthesizer(input, None)`` and may return ``(out, hidden)`` (the
            :class:`~altgrad.dni.DNINetwork` interface) or ``out``. E.g. ``LinearDNI(trigger_features +
            context_size, hidden, h_features)``.
        context_size: Number of context features (one-hot labels); 0 for none.
        mode: ``"dni"``, ``"observe"`` or ``"backprop"``.
        optimizer: Optimizer over the synthesizer's parameters, stepped right after each regression step;
            ``None`` leaves the gradients in ``.grad`` for your optimizer.
        batch_dim: Dimension of ``h`` that indexes examples.
        feature_dim: Dimension holding features (for the context); defaults to ``synthesizer.feature_dim`` or -1.

    Attributes:
        last_loss: The last regression loss (detached float32 scalar), or ``None``.
    """

    _io: BackwardInterface  # set with object.__setattr__ so it stays out of the module tree

    def __init__(
        self,
        synthesizer: nn.Module,
        *,
        context_size: int = 0,
        mode: str = "dni",
        optimizer: torch.optim.Optimizer | None = None,
        batch_dim: int = 0,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        # The backward interface's argument checks and context handling are reused for the trigger; it is
        # kept out of the module tree so that the synthesizer's state_dict keys are ``synthesizer.*``.
        io = BackwardInterface(
            synthesizer,
            context_size=context_size,
            mode=mode,
            optimizer=optimizer,
            batch_dim=batch_dim,
            feature_dim=feature_dim,
        )
        object.__setattr__(self, "_io", io)
        self.synthesizer = synthesizer
        self.last_loss: Tensor | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The synthesizer's optimizer, or ``None``."""
        return self._io.optimizer

    @property
    def mode(self) -> str:
        """``"dni"``, ``"observe"`` or ``"backprop"``."""
        return self._io.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._io.mode = value

    def _predict(self, trigger: Tensor, h: Tensor, context: Tensor | None) -> Tensor:
        if not isinstance(trigger, Tensor):
            raise TypeError(f"trigger must be a Tensor, got {type(trigger).__name__}")
        if trigger.shape[self._io.batch_dim] != h.shape[self._io.batch_dim]:
            raise ValueError(
                f"trigger has batch size {trigger.shape[self._io.batch_dim]} but h has {h.shape[self._io.batch_dim]}"
            )
        x = self._io._synth_input((trigger,), context)
        out = self.synthesizer(x, None)
        pred = out[0] if isinstance(out, tuple) else out
        if not isinstance(pred, Tensor) or pred.shape != h.shape:
            got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            raise ValueError(
                f"synthesizer {type(self.synthesizer).__name__} must return a synthetic input of h's shape "
                f"{tuple(h.shape)}, got {got}"
            )
        return pred

    @torch.compiler.disable  # runs eagerly under torch.compile (it calls autograd.backward)
    def forward(self, h: Tensor, trigger: Tensor, context: Tensor | None = None) -> Tensor:
        """Train on ``h`` and return the synthetic input (see the class docstring).

        Args:
            h: The real activation (produced by the block below).
            trigger: The synthesizer's input, for example the network input.
            context: Optional ``(B, context_size)`` context or ``(B,)`` integer labels.

        Returns:
            ``ĥ`` detached (``"dni"`` mode, training) or ``h``.
        """
        if not isinstance(h, Tensor):
            raise TypeError(f"h must be a Tensor, got {type(h).__name__}")
        if not self.training or self.mode == "backprop":
            return h
        pred = self._predict(trigger, h, context)
        batch = h.shape[self._io.batch_dim]
        if pred.requires_grad:
            diff = pred - h.detach().to(pred.dtype)
            loss = diff.pow(2).sum() / batch
            loss.backward()
            self.last_loss = loss.detach().float()
            if self.optimizer is not None:
                update(self.optimizer)
        return pred.detach().to(h.dtype) if self.mode == "dni" else h

    def synthetic_input(self, trigger: Tensor, like: Tensor, context: Tensor | None = None) -> Tensor:
        """The synthesizer's prediction for ``trigger`` (no graph, no training).

        Args:
            trigger: The synthesizer's input.
            like: A tensor of the activation's shape (checks the output shape and the batch size).
            context: Optional context.

        Returns:
            The synthetic input.
        """
        with torch.no_grad():
            return self._predict(trigger, like, context)


class BidirectionalInterface(nn.Module):
    """Synthetic input and synthetic gradient on one activation: the complete unlock.

    In ``"dni"`` mode (training), ``iface(h, trigger)``

    1. trains the forward synthesizer on ``h`` and computes ``ĥ = I(trigger)`` (:class:`ForwardInterface`),
    2. back-propagates ``scale · M(h)`` into the block below ``h`` at once (update unlocking; step its
       optimizer whenever you like),
    3. returns ``ĥ``, detached from everything below, with a synthetic-gradient tap: the gradient arriving at
       ``ĥ`` (from the loss, or bootstrapped from the next interface) trains ``M`` (loss ``‖M(ĥ) − g‖² / B``).

    ``"observe"`` mode trains both synthesizers but passes the real ``h`` and the true gradient (warm-up);
    ``"backprop"`` mode and eval mode return ``h`` untouched.

    Args:
        forward_synthesizer: Synthetic-input model (see :class:`ForwardInterface`).
        backward_synthesizer: Synthetic-gradient model (see :class:`~altgrad.dni.BackwardInterface`).
        context_size: Context features read by both synthesizers (cDNI); 0 for none.
        scale: Factor on the synthetic gradient.
        mode: ``"dni"``, ``"observe"`` or ``"backprop"``.
        forward_optimizer: Optimizer of the forward synthesizer (stepped after each regression step) or ``None``.
        backward_optimizer: Optimizer of the backward synthesizer (stepped when its targets arrive) or ``None``.
        batch_dim: Dimension indexing examples.
        feature_dim: Dimension holding features.
        diagnostics: Keep the backward interface's last prediction/target cosine.
    """

    def __init__(
        self,
        forward_synthesizer: nn.Module,
        backward_synthesizer: nn.Module,
        *,
        context_size: int = 0,
        scale: float = 1.0,
        mode: str = "dni",
        forward_optimizer: torch.optim.Optimizer | None = None,
        backward_optimizer: torch.optim.Optimizer | None = None,
        batch_dim: int = 0,
        feature_dim: int | None = None,
        diagnostics: bool = False,
    ) -> None:
        super().__init__()
        self.forward_interface = ForwardInterface(
            forward_synthesizer,
            context_size=context_size,
            mode=mode,
            optimizer=forward_optimizer,
            batch_dim=batch_dim,
            feature_dim=feature_dim,
        )
        self.backward_interface = BackwardInterface(
            backward_synthesizer,
            context_size=context_size,
            scale=scale,
            mode=mode,
            optimizer=backward_optimizer,
            batch_dim=batch_dim,
            feature_dim=feature_dim,
            diagnostics=diagnostics,
        )
        self._mode = mode

    @property
    def mode(self) -> str:
        """``"dni"``, ``"observe"`` or ``"backprop"``."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = self.forward_interface.mode = self.backward_interface.mode = check_mode(value)

    @torch.compiler.disable  # runs eagerly under torch.compile (it calls autograd.backward)
    def forward(self, h: Tensor, trigger: Tensor, context: Tensor | None = None) -> Tensor:
        """Complete unlock of ``h`` (see the class docstring).

        Args:
            h: The real activation.
            trigger: The forward synthesizer's input (for example the network input).
            context: Optional ``(B, context_size)`` context or ``(B,)`` integer labels.

        Returns:
            The tapped synthetic input (``"dni"`` mode, training) or ``h`` (``"observe"`` mode returns ``h``
            through the backward interface, which trains its synthesizer on the true gradient).
        """
        if not self.training or self._mode == "backprop":
            return h
        synthetic = self.forward_interface(h, trigger, context)
        if self._mode == "observe":
            return self.backward_interface(h, context)
        if h.requires_grad:
            torch.autograd.backward(self.backward_interface.inject(h, context=context))
        return self.backward_interface.trigger(synthetic, context=context)

    def extra_repr(self) -> str:
        return f"mode={self._mode!r}"
