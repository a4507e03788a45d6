"""Batched evaluation of a population of perturbed parameter sets.

A population is given as one stacked tensor per parameter leaf, shape ``(M, *leaf.shape)``. It is evaluated with
``torch.func.vmap`` (one batched call per chunk) when the function allows it and with a Python loop otherwise:

* ``"vmap"``: always vmap (errors propagate);
* ``"loop"``: always loop (TorchOpt's behaviour, one call per member);
* ``"auto"`` (default): vmap, falling back to the loop (for good, for this function, with one
  `VmapFallbackWarning` naming the cause) when vmap cannot batch the function, for example because it calls
  ``.item()``, branches on tensor values, updates a buffer in place or uses an op without a batching rule. Any
  other error (the user's own exceptions, a failed allocation, ``KeyboardInterrupt``) propagates and changes
  nothing: see `is_vmap_limitation`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ._errors import OutputTypeError

__all__ = ["BATCHING_MODES", "Batching", "PopulationEvaluator", "VmapFallbackWarning", "is_vmap_limitation"]

Batching = Literal["auto", "vmap", "loop"]
#: Accepted values of ``batching=``.
BATCHING_MODES: tuple[str, ...] = ("auto", "vmap", "loop")


class VmapFallbackWarning(UserWarning):
    """``batching="auto"``: ``torch.func.vmap`` cannot batch the function; members are evaluated in a loop."""


_VMAP_MARKERS = (
    "vmap",  # vmap's own errors: .item(), data-dependent control flow, dynamic shapes, in-place on unbatched
    "batching rule",  # an op without a batching rule and no fallback
    "functorch",  # autograd.Function without setup_context / vmap staticmethod
    "batchedtensor",
    "doesn't have storage",  # .numpy(), .tolist(), C extensions reading the data pointer of a batched tensor
)


def is_vmap_limitation(error: BaseException) -> bool:
    """Whether ``error``, raised by a ``torch.func.vmap`` evaluation, says that vmap cannot batch the function.

    Only ``RuntimeError``/``NotImplementedError`` can be: exceptions of other types (the user's own), allocation
    failures (``torch.OutOfMemoryError``, "can't allocate memory") and non-``Exception`` ones (``KeyboardInterrupt``)
    never are. A ``RuntimeError`` naming vmap, a batching rule or functorch is; another ``RuntimeError`` (for
    example a shape error from an in-place update of an unbatched tensor) is judged by `PopulationEvaluator`: vmap's
    if one member runs without vmap and vmap fails again (a one-off error propagates).

    Args:
        error: The exception.

    Returns:
        True if the message identifies a vmap limitation.
    """
    if not _maybe_vmap_limitation(error):
        return False
    message = str(error).lower()
    return any(marker in message for marker in _VMAP_MARKERS)


def _maybe_vmap_limitation(error: BaseException) -> bool:
    if not isinstance(error, (RuntimeError, NotImplementedError)):
        return False
    if isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return False
    message = str(error).lower()
    return "can't allocate memory" not in message and "out of memory" not in message


def check_output(output: object) -> Tensor:
    """Apply TorchOpt's output contract: a tensor with zero dimensions."""
    if not isinstance(output, Tensor):
        raise OutputTypeError("`output` must be a tensor.")
    if output.ndim != 0:
        raise RuntimeError("`output` must be a scalar tensor.")
    return output


class PopulationEvaluator:
    """Evaluate ``fn(*leaves)`` for every member of a stacked population.

    Args:
        fn: Function of the (perturbed) parameter leaves returning a scalar tensor.
        batching: ``"auto"``, ``"vmap"`` or ``"loop"``.

    Attributes:
        resolved: The mode in use: ``"vmap"`` or ``"loop"`` once decided, ``None`` before the first call in
            ``"auto"`` mode.
    """

    def __init__(self, fn: Callable[..., Tensor], batching: str = "auto") -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(f"`batching` must be one of {BATCHING_MODES}, got {batching!r}")
        self.fn = fn
        self.batching = batching
        self.resolved: str | None = None if batching == "auto" else batching

    def __call__(self, leaves: Sequence[Tensor]) -> Tensor:
        """Return the values of all members, shape ``(M,)``.

        Args:
            leaves: One tensor per leaf, each of shape ``(M, *leaf.shape)``.

        Returns:
            1-D tensor of the M function values.
        """
        if self.resolved != "loop":
            try:
                values = self._vmap(leaves)
            except Exception as error:
                if self.batching == "vmap" or not _maybe_vmap_limitation(error):
                    raise
                if not is_vmap_limitation(error) and not self._recurs_under_vmap_only(leaves):
                    raise
                self.resolved = "loop"
                cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warnings.warn(
                    f"batching='auto': torch.func.vmap cannot batch this function ({type(error).__name__}: "
                    f"{cause[:300]}); its members are evaluated one at a time in a Python loop from now on. Pass "
                    "batching='loop' to choose the loop (no warning), or make the function vmappable.",
                    VmapFallbackWarning,
                    stacklevel=2,
                )
            else:
                self.resolved = "vmap"
                return values
        return self._loop(leaves)

    def _recurs_under_vmap_only(self, leaves: Sequence[Tensor]) -> bool:
        """For an error vmap raised that does not name vmap: whether it is vmap's (one member runs without vmap
        and vmap fails again) rather than a real or a one-off error. A member's own error propagates from here."""
        check_output(self.fn(*(leaf[0] for leaf in leaves)))
        try:
            self._vmap(leaves)
        except Exception as again:
            return _maybe_vmap_limitation(again)
        return False

    def _vmap(self, leaves: Sequence[Tensor]) -> Tensor:
        def member(*member_leaves: Tensor) -> Tensor:
            return check_output(self.fn(*member_leaves))

        values = torch.func.vmap(member, randomness="different")(*leaves)
        return values.reshape(-1)

    def _loop(self, leaves: Sequence[Tensor]) -> Tensor:
        m = leaves[0].shape[0]
        return torch.stack([check_output(self.fn(*(leaf[k] for leaf in leaves))) for k in range(m)])
