"""The low-level primitive: a backward interface on any activation.

A :class:`BackwardInterface` cuts the autograd graph at an activation ``h``. The block below ``h`` is trained
from the synthetic gradient ``ŝ = M(h, c)``; the synthesizer ``M`` is trained by regression onto the gradient
that later arrives at ``h`` (true at the top, bootstrapped from the next interface below it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._functional import (
    broadcast_context,
    cosine_similarity,
    mix_gradient,
    sg_loss,
    sg_loss_grad,
    synthetic_weight,
)
from ._optim import update

__all__ = ["MODES", "BackwardInterface"]

#: Interface modes: ``"dni"`` uses synthetic gradients, ``"observe"`` trains the synthesizer but sends the
#: true gradient down (warm-up), ``"backprop"`` is a transparent pass-through.
MODES = ("dni", "observe", "backprop")
_INJECT = ("immediate", "deferred")

S = TypeVar("S", Tensor, tuple[Tensor, ...], list[Tensor])


_SERIAL = (
    itertools.count()
)  # creation order of predictions (the wrapper abandons those made by a failed forward)


def next_serial() -> int:
    """A number lower than the serial of every prediction made after this call."""
    return next(_SERIAL)


class PlainState(nn.Module):
    """A module whose per-step bookkeeping attributes (``_STATE``) bypass ``nn.Module.__setattr__``.

    ``nn.Module.__setattr__`` checks every assignment against the module's parameters, submodules and buffers
    (about 6 µs on CPU). The interfaces and the wrapper set a few plain counters and flags dozens of times per
    training step; those never hold a parameter, module or buffer, so they go straight to the instance
    ``__dict__``, which is where ``nn.Module.__setattr__`` would put them too.
    """

    _STATE: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`; raise ``ValueError`` naming it otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class _Prediction:
    """One synthesizer prediction waiting for its target gradient (lives on the autograd node).

    A prediction whose graph stays alive without a backward pass ever reaching it (an abandoned forward whose
    traceback is kept, say in ``sys.last_traceback``) is *abandoned* (:meth:`abandon`): it stops counting as
    pending, so later synthesizer updates are not held back; if its target still arrives, it trains nothing and
    the gradient sent below is computed as before.
    """

    __slots__ = (
        "__weakref__",
        "abandoned",
        "batch_size",
        "connected",
        "consumed",
        "iface",
        "lam",
        "pred",
        "serial",
        "sizes",
    )

    def __init__(
        self,
        iface: BackwardInterface,
        pred: Tensor,
        sizes: list[int],
        batch_size: int,
        connected: bool,
        lam: float,
    ) -> None:
        self.iface = iface
        self.pred: Tensor | None = pred
        self.sizes = sizes
        self.batch_size = batch_size
        self.connected = connected
        self.lam = lam
        self.consumed = False
        self.abandoned = False
        self.serial = next(_SERIAL)
        iface._pending += 1
        iface._records[self.serial] = weakref.ref(self)

    def abandon(self) -> bool:
        """Stop waiting for this prediction's target; ``True`` if it was pending."""
        if self.consumed or self.abandoned:
            return False
        self.abandoned = True
        if self.pred is not None:
            self.pred = self.pred.detach()  # frees the synthesizer's graph; the value still serves the mix
        self.iface._pending -= 1
        self.iface._records.pop(self.serial, None)
        self.iface.abandoned += 1
        return True

    def backward(self, grads: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        iface = self.iface
        if self.consumed or self.pred is None:
            raise RuntimeError(
                "a DNI interface received gradients in two separate backward passes (for example a skip "
                "connection around an interface whose synthetic gradient was applied at forward time); "
                "use inject='deferred' so that every path reaches the interface in one backward pass"
            )
        self.consumed = True
        pred, self.pred = self.pred, None
        if not self.abandoned:
            iface._records.pop(self.serial, None)
            if self.serial > iface._last_arrived:
                iface._last_arrived = self.serial
            target = grads[0] if len(grads) == 1 else torch.cat(grads, dim=iface.feature_dim)
            if pred.requires_grad:
                grad = sg_loss_grad(pred, target, self.batch_size)
                if iface._deferred is not None:  # back-propagated with the others at the end of the pass
                    iface._deferred.add(pred, grad)
                else:
                    run_backward((pred,), (grad,))
            iface._observe(pred, target, self.batch_size)
            iface._target_arrived()
        if not self.connected:
            return (None,) * len(grads)
        sg = pred.detach()
        parts = sg.split(self.sizes, dim=iface.feature_dim) if len(grads) > 1 else (sg,)
        return tuple(
            mix_gradient(g, s, self.lam, iface.scale).to(g.dtype) for g, s in zip(grads, parts, strict=True)
        )

    def __del__(self) -> None:
        # The graph was freed without a backward pass reaching this prediction: stop waiting for it.
        if not getattr(self, "consumed", True) and not getattr(self, "abandoned", True):
            with contextlib.suppress(Exception):  # interpreter shutdown
                self.iface._pending -= 1
                self.iface._records.pop(self.serial, None)


def _alias(t: Tensor, protect: bool) -> Tensor:
    """``t`` as a custom Function's output that the layers above may modify in place, like ``t`` itself.

    A view made inside a custom Function may not be modified in place, and models do that right after an
    interface (``ReLU(inplace=True)``), so the output is an alias (``detach``: same storage and version counter,
    so whatever saved ``t`` for its backward still detects a change, as in plain autograd). When ``t`` is a
    parameter, or a view of one (``protect``), a view is returned instead: autograd refuses to let it be modified
    in place, as it refuses for the parameter itself.
    """
    return t.view_as(t) if protect else t.detach()


def _protected(t: Tensor) -> bool:
    """Whether ``t`` is a leaf that requires grad (a parameter), or a view of one."""
    base = t._base if t._is_view() else t
    return base is not None and base.is_leaf and base.requires_grad


class _Boundary(torch.autograd.Function):
    """Identity on ``tensors``; its backward hands the arriving gradient to the :class:`_Prediction`."""

    @staticmethod
    def forward(ctx: Any, record: _Prediction, anchor: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.record = record
        return tuple(_alias(t, _protected(t)) for t in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, None, *ctx.record.backward(grads))


class _Cut(torch.autograd.Function):
    """The update-unlocked boundary: the value of ``h`` cut off from the block below (nothing goes below it, so
    unlike :class:`_Boundary` there is no gradient to keep from being differentiated twice); its backward hands
    the arriving gradient, the synthesizer's target, to the :class:`_Prediction`."""

    @staticmethod
    def forward(ctx: Any, record: _Prediction, anchor: Tensor, h: Tensor, protect: bool) -> Tensor:  # type: ignore[override]
        ctx.record = record
        return _alias(h, protect)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        ctx.record.backward((grad,))
        return None, None, None, None


class _Inject(torch.autograd.Function):
    """A zero-valued scalar whose gradient with respect to ``tensors`` is the given synthetic gradient."""

    @staticmethod
    def forward(ctx: Any, grads: tuple[Tensor, ...], *tensors: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return tensors[0].new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *(g * grad_out.to(g.dtype) for g in ctx.grads))


def _check_float(name: str, value: Any, lo: float, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (value >= lo and (hi is None or value <= hi)):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


def _check_lam(lam: Any) -> float:
    """``lam`` in [0, 1], or exactly -1 (pytorch-dni HEAD's "true + synthetic gradient")."""
    if not isinstance(lam, bool) and isinstance(lam, (int, float)) and float(lam) == -1.0:
        return -1.0
    try:
        return _check_float("lam", lam, 0.0, 1.0)
    except ValueError:
        raise ValueError(
            f"lam (λ) must be in [0, 1] or exactly -1 (true + synthetic gradient), got {lam}"
        ) from None


class BackwardInterface(PlainState):
    """A decoupled neural interface (backward direction) on one activation.

    Feed-forward use: ``h = iface(h)`` right after the block that produces ``h``. In ``"dni"`` mode with
    ``lam=0`` and ``inject="immediate"`` (the default) this

    1. predicts ``ŝ = synthesizer(h.detach(), context)``,
    2. back-propagates ``scale·ŝ`` into the block below **at once** (its parameters receive their gradient,
       and can be stepped, before anything above ``h`` has run: update unlocking),
    3. returns ``h`` cut off from the block below; the gradient ``g`` that later arrives there is the
       regression target of the synthesizer (loss ``‖ŝ − g‖² / B``) and is not propagated further (backward
       unlocking). Stacked interfaces therefore bootstrap: an interface's target is the next interface's
       synthetic gradient back-propagated through the block between them.

    Recurrent use (truncated BPTT, paper §3.1): at the start of a window ``state = iface.trigger(state)``;
    at its end ``loss = loss + iface.inject(final_state)``, which adds a zero-valued term whose gradient with
    respect to ``final_state`` is ``scale·ŝ`` (the paper uses ``scale=0.1``). The synthesizer's target at the
    window start then contains the bootstrapped synthetic gradient injected at the window end. Tuple states
    such as an LSTM's ``(h, c)`` are concatenated along :attr:`feature_dim` for the synthesizer.

    The synthesizer's optimizer, if given, is stepped as soon as all targets of its pending predictions have
    arrived, so the synthesizer is updated without waiting for the end of the step.

    Args:
        synthesizer: Maps the activation (with the context concatenated along ``feature_dim``) to a tensor of
            the activation's shape. Called as ``synthesizer(input, hidden)`` and may return ``(grad, hidden)``
            (the :class:`~altgrad.dni.DNINetwork` interface) or just ``grad``.
        context_size: Number of context features (for example classes of a one-hot label, cDNI); 0 for none.
        lam: BP(λ) mixing in ``"dni"`` mode: the block below receives ``lam·g + (1 − lam)·scale·ŝ``. Only
            ``lam=0`` is update-unlocked; ``lam=1`` equals backprop. ``lam=-1`` (pytorch-dni HEAD's
            "DNI + BP") sends ``g + scale·ŝ``.
        scale: Factor applied to the synthetic gradient before it is used.
        inject: ``"immediate"`` back-propagates the synthetic gradient at forward time; ``"deferred"`` returns it
            from the boundary during the ordinary backward pass (same maths, one backward; needed when a path
            bypasses the interface, such as a residual connection).
        mode: ``"dni"``, ``"observe"`` (train the synthesizer, send the true gradient down) or ``"backprop"``
            (pass-through).
        optimizer: Optimizer over the synthesizer's parameters, stepped by the interface; ``None`` leaves the
            gradients in ``.grad`` for your own optimizer.
        batch_dim: Dimension of the activation that indexes examples (the loss divides by its size).
        feature_dim: Dimension holding features; defaults to ``synthesizer.feature_dim`` or ``-1``.
        diagnostics: Keep the last prediction and target and their cosine similarity.

    Under ``torch.compile`` the interface's methods run eagerly (``torch.compiler.disable``, a graph break):
    they call ``autograd.backward`` and keep Python state between the forward and backward passes.

    A prediction still waiting for its target when the target of a later prediction has arrived is
    *abandoned* at the next prediction, with a warning: that happens when a forward was given up while its graph
    stays referenced, for example by the traceback of an exception kept in ``sys.last_traceback`` in a REPL or
    Jupyter. It no longer holds back the synthesizer's updates and, should its target still arrive, trains
    nothing (the gradient sent to the block below is unchanged). :meth:`abandon_pending` does it explicitly;
    :attr:`abandoned` counts them.

    Attributes:
        abandoned: Number of predictions abandoned so far (see above); 0 in normal training.
        last_loss: The last synthesizer loss (a detached float32 scalar tensor), or ``None``.
        last_cosine: Cosine between the last prediction and its target (``diagnostics=True``), or ``None``.
        last_target: The last target gradient (``diagnostics=True``), or ``None``.
        last_prediction: The last synthetic gradient whose target arrived (``diagnostics=True``), or ``None``.
    """

    _STATE = frozenset(
        {
            "_due",
            "_pending",
            "_hidden",
            "_last_arrived",
            "_last",
            "last_cosine",
            "last_target",
            "last_prediction",
        }
    )

    def __init__(
        self,
        synthesizer: nn.Module,
        *,
        context_size: int = 0,
        lam: float = 0.0,
        scale: float = 1.0,
        inject: str = "immediate",
        mode: str = "dni",
        optimizer: torch.optim.Optimizer | None = None,
        batch_dim: int = 0,
        feature_dim: int | None = None,
        diagnostics: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(synthesizer, nn.Module):
            raise TypeError(f"synthesizer must be an nn.Module, got {type(synthesizer).__name__}")
        if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 0:
            raise ValueError(f"context_size must be an int >= 0, got {context_size!r}")
        if inject not in _INJECT:
            raise ValueError(f"inject must be one of {_INJECT}, got {inject!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        self.synthesizer = synthesizer
        self.context_size = context_size
        self.lam = _check_lam(lam)
        self.scale = _check_float("scale", scale, 0.0)
        self.inject_mode = inject
        self.mode = mode
        self.optimizer = optimizer
        self.batch_dim = int(batch_dim)
        self.feature_dim = int(
            feature_dim if feature_dim is not None else getattr(synthesizer, "feature_dim", -1)
        )
        self.diagnostics = bool(diagnostics)
        # (prediction, target, B, loss or None) of the last target: the loss is computed when read (last_loss).
        self._last: list[Any] | None = None
        self.last_cosine: Tensor | None = None
        self.last_target: Tensor | None = None
        self.last_prediction: Tensor | None = None
        self._hidden: Any = None
        self._pending = 0
        self._records: dict[int, weakref.ref[_Prediction]] = {}  # pending predictions by serial
        self._last_arrived = -1  # serial of the newest prediction whose target arrived
        self._due = False
        self.abandoned = 0
        # Set by an owner that steps the synthesizer itself (the DNI wrapper): the synthesizer's loss gradients
        # are collected there and back-propagated together (see DeferredGradients) instead of in one nested
        # backward pass per target.
        self._deferred: DeferredGradients | None = None

    def __getstate__(self) -> dict[str, Any]:
        """State for ``copy.deepcopy`` / pickling: predictions waiting in the original's graph stay there.

        Deferred synthesizer gradients (see ``_deferred``) are back-propagated first, so that the copy's
        synthesizer holds the same ``.grad`` as the original's (the list, emptied, stays shared with the owner).
        """
        if self._deferred is not None:
            self._deferred.flush()
        state = self.__dict__.copy()
        state["_pending"] = 0
        state["_records"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy; one pickled by an earlier version gets the attributes added since."""
        super().__setstate__(state)
        self.__dict__.setdefault("_deferred", None)
        if isinstance(self._deferred, list) and not isinstance(self._deferred, DeferredGradients):
            self._deferred = None  # a plain list from an earlier version: the owner rewires it
        if "_last" not in self.__dict__:
            args = self.__dict__.pop("_loss_args", None)
            self.__dict__.pop("_loss", None)
            self._last = None if args is None else [*args, None]

    # ------------------------------------------------------------------ configuration
    @property
    def mode(self) -> str:
        """``"dni"``, ``"observe"`` or ``"backprop"`` (see the class docstring)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_mode(value)

    @property
    def unlocked(self) -> bool:
        """Whether the synthetic gradient is applied at forward time (``"dni"``, ``lam=0``, immediate)."""
        return self._mode == "dni" and self.lam == 0.0 and self.inject_mode == "immediate"

    def reset_state(self) -> None:
        """Forget the synthesizer's recurrent state (for :class:`~altgrad.dni.RNNDNI`)."""
        self._hidden = None

    def extra_repr(self) -> str:
        return (
            f"mode={self._mode!r}, lam={self.lam}, scale={self.scale}, inject={self.inject_mode!r}, "
            f"context_size={self.context_size}"
        )

    # ------------------------------------------------------------------ public API
    @torch.compiler.disable  # runs eagerly under torch.compile (see the class docstring)
    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        """Put the interface on activation ``h`` (feed-forward use).

        Args:
            h: The activation produced by the block below the interface.
            context: Optional ``(B, context_size)`` context (or ``(B,)`` integer labels, one-hot encoded).

        Returns:
            A tensor equal to ``h``. In eval mode, in ``"backprop"`` mode, or when ``h`` does not require
            grad, ``h`` itself.
        """
        return self._forward(h, context)

    def _forward(self, h: Tensor, context: Tensor | None) -> Tensor:
        """:meth:`forward` itself, for callers that already run eagerly (the wrapper's hook calls it directly)."""
        if not isinstance(h, Tensor):
            raise TypeError(f"h must be a Tensor, got {type(h).__name__}")
        if not self.training or self._mode == "backprop" or not h.requires_grad:
            return h
        pred = self._predict((h,), context)
        if self.unlocked:
            sg = mix_gradient(None, pred.detach(), 0.0, self.scale)
            run_backward((h,), (sg if sg.dtype == h.dtype else sg.to(h.dtype),))
            return self._cut(pred, h)
        return self._boundary(pred, (h,), connected=True)[0]

    @torch.compiler.disable  # runs eagerly under torch.compile (see the class docstring)
    def trigger(self, state: S, context: Tensor | None = None) -> S:
        """Mark the start of a truncated-BPTT window (recurrent use).

        The synthesizer predicts the gradient of the future loss with respect to ``state``; the gradient that
        arrives at the returned state during the window's backward pass (including whatever
        :meth:`inject` added at the window end) is its regression target.

        Args:
            state: The carried state, usually detached from the previous window: a tensor or a tuple/list of
                tensors (for example an LSTM's ``(h, c)``).
            context: Optional context, as in :meth:`forward`.

        Returns:
            ``state`` with the same structure, connected to the interface.
        """
        tensors = self._as_tensors("state", state)
        if not self.training or self._mode == "backprop":
            return state
        pred = self._predict(tensors, context)
        lam = 1.0 if self._mode == "observe" else self.lam
        out = self._boundary(pred, tensors, connected=any(t.requires_grad for t in tensors), lam=lam)
        return self._restructure(state, out)

    @torch.compiler.disable  # runs eagerly under torch.compile (see the class docstring)
    def inject(
        self, state: Tensor | Sequence[Tensor], scale: float | None = None, context: Tensor | None = None
    ) -> Tensor:
        """Inject the synthetic gradient at the end of a truncated-BPTT window (recurrent use).

        Args:
            state: The final state of the window (graph-connected), same structure as for :meth:`trigger`.
            scale: Factor on the synthetic gradient; defaults to the interface's ``scale`` (the paper: 0.1).
            context: Optional context, as in :meth:`forward`.

        Returns:
            A zero-valued scalar: add it to the window's loss before calling ``backward``. Its gradient with
            respect to ``state`` is ``scale·ŝ`` in ``"dni"`` mode and zero otherwise.
        """
        tensors = self._as_tensors("state", state)
        factor = self.scale if scale is None else _check_float("scale", scale, 0.0)
        if not self.training or self._mode != "dni" or not any(t.requires_grad for t in tensors):
            return tensors[0].new_zeros(())
        with torch.no_grad():
            sg = self._predict(tensors, context) * (factor * synthetic_weight(self.lam))
        parts = sg.split([t.shape[self.feature_dim] for t in tensors], dim=self.feature_dim)
        return _Inject.apply(tuple(p.to(t.dtype) for p, t in zip(parts, tensors, strict=True)), *tensors)

    def synthetic_gradient(self, h: Tensor | Sequence[Tensor], context: Tensor | None = None) -> Tensor:
        """The synthesizer's prediction for ``h`` (no autograd graph, no side effects on training state).

        Args:
            h: An activation or a tuple of state tensors.
            context: Optional context, as in :meth:`forward`.

        Returns:
            The predicted gradient (tuple states: concatenated along :attr:`feature_dim`), unscaled.
        """
        tensors = self._as_tensors("h", h)
        hidden = self._hidden
        with torch.no_grad():
            out = self._call(self._synth_input(tensors, context), hidden, tensors)[0]
        return out

    def abandon_pending(self, since: int = 0) -> int:
        """Stop waiting for the targets of the predictions still pending (see the class docstring).

        Args:
            since: Only predictions made after :func:`next_serial` returned this value (0: all of them).

        Returns:
            The number of predictions abandoned.
        """
        records = [ref() for serial, ref in list(self._records.items()) if serial >= since]
        return sum(record.abandon() for record in records if record is not None)

    def _abandon_stale(self) -> int:
        """Abandon the pending predictions older than one whose target has arrived (see the class docstring)."""
        if not self._records:  # nothing pending: the common case, on every step
            return 0
        records = [ref() for serial, ref in list(self._records.items()) if serial < self._last_arrived]
        return sum(record.abandon() for record in records if record is not None)

    def step(self) -> None:
        """Step the synthesizer optimizer now if gradients are waiting (normally automatic)."""
        if self.optimizer is not None and self._due:
            update(self.optimizer)
        self._due = False

    # ------------------------------------------------------------------ internals
    def _as_tensors(self, name: str, state: Any) -> tuple[Tensor, ...]:
        tensors = (
            (state,)
            if isinstance(state, Tensor)
            else tuple(state)
            if isinstance(state, (tuple, list))
            else ()
        )
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError(
                f"{name} must be a Tensor or a non-empty tuple/list of Tensors, got {type(state).__name__}"
            )
        return tensors

    @staticmethod
    def _restructure(state: Any, out: tuple[Tensor, ...]) -> Any:
        if isinstance(state, Tensor):
            return out[0]
        return type(state)(out)

    def _context(self, context: Tensor | None, like: Tensor) -> Tensor | None:
        if not self.context_size:
            if context is not None:
                raise ValueError("context was given but the interface was built with context_size=0")
            return None
        if not isinstance(context, Tensor):
            if context is None:
                raise ValueError(
                    f"this interface is conditional (context_size={self.context_size}); pass context="
                )
            raise TypeError(f"context must be a Tensor, got {type(context).__name__}")
        batch = like.shape[self.batch_dim]
        if not context.is_floating_point():
            context = one_hot_labels(context, self.context_size)
        if context.shape != (batch, self.context_size):
            raise ValueError(
                f"context must have shape (B, context_size) = ({batch}, {self.context_size}), got {tuple(context.shape)}"
            )
        return broadcast_context(context.detach(), like, self.batch_dim, self.feature_dim)

    def _synth_input(self, tensors: tuple[Tensor, ...], context: Tensor | None) -> Tensor:
        ctx = self._context(context, tensors[0])
        if ctx is None and len(tensors) == 1:
            return tensors[0].detach()
        parts = [t.detach() for t in tensors]
        if ctx is not None:
            parts.append(ctx)
        return torch.cat(parts, dim=self.feature_dim)

    def _call(self, x: Tensor, hidden: Any, tensors: tuple[Tensor, ...]) -> tuple[Tensor, Any]:
        # not through nn.Module.__getattr__: this runs every step
        synthesizer = cast(nn.Module, self._modules["synthesizer"])
        wanted = getattr(synthesizer, "input_size", None)
        if isinstance(wanted, int) and x.shape[self.feature_dim] != wanted:
            raise ValueError(
                f"synthesizer {type(self.synthesizer).__name__} reads {wanted} features along dim {self.feature_dim} "
                f"but the activation (plus context) of shape {tuple(x.shape)} has {x.shape[self.feature_dim]}: it "
                "cannot produce this activation's gradient (for a (B, C, ...) feature map use Conv1dDNI, Conv2dDNI "
                "or Conv3dDNI)"
            )
        out = synthesizer(x, hidden)
        pred, hidden = out if isinstance(out, tuple) else (out, None)
        if len(tensors) == 1 and isinstance(pred, Tensor) and pred.shape == tensors[0].shape:
            return pred, hidden
        fd = self.feature_dim % tensors[0].dim()
        expected = list(tensors[0].shape)
        expected[fd] = sum(t.shape[fd] for t in tensors)
        if not isinstance(pred, Tensor) or list(pred.shape) != expected:
            got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            raise ValueError(
                f"synthesizer {type(self.synthesizer).__name__} must return a gradient of the activation's shape "
                f"{tuple(expected)}, got {got}; the synthesizer cannot produce this activation's shape (for a "
                f"(B, C, ...) feature map use Conv1dDNI, Conv2dDNI or Conv3dDNI)"
            )
        return pred, hidden

    def _predict(self, tensors: tuple[Tensor, ...], context: Tensor | None) -> Tensor:
        """The synthesizer's prediction for ``tensors`` (whose aliases the caller returns)."""
        if self._pending:
            abandon_warning(self._abandon_stale())
        if self._due and not self._pending:
            self.step()
        x = self._synth_input(tensors, context)
        if len(tensors) == 1 and self.context_size == 0 and torch.is_grad_enabled():
            # x is the activation itself, which the synthesizer keeps for its backward; the interface's output
            # is an alias of it that the layers above may modify in place (ReLU(inplace=True)): read a copy.
            x = x.clone()
        pred, hidden = self._call(x, self._hidden, tensors)
        if hidden is not None or self._hidden is not None:
            self._hidden = _detach(hidden)
        return pred

    def _cut(self, pred: Tensor, h: Tensor) -> Tensor:
        """The unlocked boundary on ``h`` (:class:`_Cut`): the block below is cut off; the gradient arriving above
        is the synthesizer's target."""
        record = _Prediction(
            self, pred, [h.shape[self.feature_dim]], int(h.shape[self.batch_dim]), False, 0.0
        )
        # The anchor makes the output require grad although h.detach() does not.
        return _Cut.apply(record, pred.detach().requires_grad_(), h.detach(), _protected(h))

    def _boundary(
        self, pred: Tensor, tensors: tuple[Tensor, ...], *, connected: bool, lam: float | None = None
    ) -> tuple[Tensor, ...]:
        if lam is None:
            lam = 1.0 if self._mode == "observe" else self.lam
        fd = self.feature_dim
        sizes = [tensors[0].shape[fd]] if len(tensors) == 1 else [t.shape[fd] for t in tensors]
        record = _Prediction(self, pred, sizes, int(tensors[0].shape[self.batch_dim]), connected, lam)
        # The anchor is a fresh leaf that makes the boundary's output require grad even when ``tensors`` are
        # detached (connected: some of them require grad); the prediction's own graph is back-propagated by the
        # record, never by the outer pass.
        anchor = pred.detach().requires_grad_(not connected or pred.requires_grad)
        return _Boundary.apply(record, anchor, *tensors)

    @property
    def last_loss(self) -> Tensor | None:
        """The last synthesizer loss (a detached float32 scalar tensor), or ``None``.

        Computed when read, from the last prediction and target (kept detached), so that training steps do not
        pay for a loss nobody reads.
        """
        last = self._last
        if last is None:
            return None
        if last[3] is None:
            last[3] = sg_loss(last[0], last[1], last[2])
        return last[3]

    def _observe(self, pred: Tensor, target: Tensor, batch_size: int) -> None:
        self._last = [pred.detach(), target.detach(), batch_size, None]
        if self.diagnostics:
            self.last_prediction = pred.detach()
            self.last_target = target.detach()
            self.last_cosine = cosine_similarity(pred, target)

    def _target_arrived(self) -> None:
        self._pending -= 1
        if self.optimizer is not None:  # without one, nothing is ever due
            self._due = True
            if not self._pending:
                self.step()


def one_hot_labels(labels: Tensor, size: int) -> Tensor:
    """``(B,)`` integer labels as a ``(B, size)`` one-hot context in the default float dtype.

    Raises:
        ValueError: If ``labels`` is not one-dimensional or a label is outside ``[0, size)``.
    """
    if labels.dim() != 1:
        raise ValueError(f"integer context must be (B,) labels, got shape {tuple(labels.shape)}")
    index = labels.long().unsqueeze(1)
    # broadcast_context casts to each activation's dtype, so this dtype does not change a value.
    out = torch.zeros(labels.shape[0], size, dtype=torch.get_default_dtype(), device=labels.device)
    if labels.device.type == "cpu":
        # scatter_ checks the bounds itself on CPU (both ends): no min / max pass (F.one_hot makes two).
        try:
            return out.scatter_(1, index, 1.0)
        except RuntimeError:
            pass
    elif labels.numel():
        low, high = torch.aminmax(labels)  # a device kernel would only assert: check first (one sync)
        if not (int(low) < 0 or int(high) >= size):
            return out.scatter_(1, index, 1.0)
    else:
        return out
    raise ValueError(f"integer context labels must be in [0, {size}), got out-of-range labels")


_ENGINE = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
_GRAPH_LOG = logging.getLogger("torch.autograd.graph")  # torch.autograd.backward logs the graph at DEBUG


def run_backward(tensors: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> None:
    """``torch.autograd.backward(tensors, grads)`` for gradients made to match their tensors.

    Plain CPU tensors whose gradients have their shape (and are real where they are) go to the autograd engine
    directly: ``torch.autograd.backward``'s Python around it (argument normalisation, ``__torch_function__``
    dispatch, the gradients' checks, a debug-logging hook and the context kept for device threads) costs about
    9 µs per call alone and about 25 µs in a training step, and the wrapper makes a few per interface and step.
    The engine itself still refuses a tensor that does not require grad. Anything else goes through
    ``torch.autograd.backward``, with its checks and messages: tensor subclasses, an active ``__torch_function__``
    mode (``with torch.device(...)``, say) or functorch transform (``torch.func.grad``), the autograd graph's
    debug log (``TORCH_LOGS="+autograd"``), other devices, a gradient of another shape (the engine would sum a
    broadcastable one) or a real gradient for a complex tensor.
    """
    if (
        not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
        and not _GRAPH_LOG.isEnabledFor(logging.DEBUG)
        and all(
            type(t) is Tensor
            and type(g) is Tensor
            and t.device.type == "cpu"
            and g.device.type == "cpu"
            and t.shape == g.shape
            and t.is_complex() == g.is_complex()
            for t, g in zip(tensors, grads, strict=True)
        )
    ):
        _ENGINE.run_backward(tensors, grads, False, False, (), allow_unreachable=True, accumulate_grad=True)
    else:
        torch.autograd.backward(tensors, grads)


class DeferredGradients(list):  # type: ignore[type-arg]
    """Synthesizer loss gradients as ``(prediction, gradient)`` pairs, back-propagated together.

    A target that arrives during a backward pass queues :meth:`flush` to run when that pass ends (an autograd
    engine callback), so the synthesizers' ``.grad`` is complete when ``backward()`` returns, as if each target
    had back-propagated its own loss at once, but in one backward pass instead of one nested pass per target.
    Every target queues its own callback (about 0.3 µs; the first flushes them all, the others find nothing):
    a pass that fails drops the callbacks it queued, so a "queued" flag would stay set and leave the targets of
    later passes waiting. A failed pass's targets wait for the next flush. While ``holding`` (the wrapper sets it
    during its forward, whose interfaces back-propagate synthetic gradients at once) targets only accumulate, and
    the wrapper flushes them when the forward returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.holding = False

    def add(self, pred: Tensor, grad: Tensor) -> None:
        """Collect one pair (called from a backward pass)."""
        self.append((pred, grad))
        if not self.holding:
            _ENGINE.queue_callback(self.flush)

    def flush(self) -> None:
        """Back-propagate the collected pairs in one backward pass and forget them."""
        if self:
            preds, grads = zip(*self, strict=True)
            self.clear()
            run_backward(preds, grads)


_INTERNAL = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning issued by the caller names the user's line.

    That is the first frame outside torch and this package, however many wrappers (``nn.Module.__call__``,
    ``torch.compiler.disable``, the autograd engine's callbacks) sit between it and the code that warns.
    """
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    return level


def abandon_warning(count: int) -> None:
    """Say that ``count`` pending predictions were abandoned because an update was due."""
    if count:
        warnings.warn(
            f"{count} synthetic-gradient prediction(s) were still waiting for their target gradient when a "
            "synthesizer update was due; they are abandoned and will train nothing. This happens when a forward "
            "was given up while its graph stays referenced (for example by an exception's traceback kept in "
            "sys.last_traceback); see BackwardInterface.abandoned and DNI.diagnostics()",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def _detach(hidden: Any) -> Any:
    if hidden is None:
        return None
    if isinstance(hidden, Tensor):
        return hidden.detach()
    if isinstance(hidden, (tuple, list)):
        return type(hidden)(_detach(h) for h in hidden)
    return hidden
