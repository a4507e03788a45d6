"""Batched evaluation of a population of perturbed parameter sets.

A population is given as one stacked tensor per parameter leaf, shape ``(M, *leaf.shape)``. It is evaluated with
``torch.func.vmap`` (one batched call per chunk) when the function allows it and with a Python loop otherwise:

* ``"vmap"``: always vmap (errors propagate);
* ``"loop"``: always loop (TorchOpt's behaviour, one call per member);
* ``"auto"`` (default): vmap, falling back to the loop (for good, for this function) the first time vmap fails,
  for example because the function calls ``.item()``, branches on tensor values or updates a buffer in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ._errors import OutputTypeError

__all__ = ["BATCHING_MODES", "Batching", "PopulationEvaluator"]

Batching = Literal["auto", "vmap", "loop"]
#: Accepted values of ``batching=``.
BATCHING_MODES: tuple[str, ...] = ("auto", "vmap", "loop")


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
            except Exception:
                if self.batching == "vmap":
                    raise
                self.resolved = "loop"
            else:
                self.resolved = "vmap"
                return values
        return self._loop(leaves)

    def _vmap(self, leaves: Sequence[Tensor]) -> Tensor:
        def member(*member_leaves: Tensor) -> Tensor:
            return check_output(self.fn(*member_leaves))

        values = torch.func.vmap(member, randomness="different")(*leaves)
        return values.reshape(-1)

    def _loop(self, leaves: Sequence[Tensor]) -> Tensor:
        m = leaves[0].shape[0]
        return torch.stack([check_output(self.fn(*(leaf[k] for leaf in leaves))) for k in range(m)])
