"""Which watched tensors a forward reads the values of, seen through a torch function mode.

The Linear fast path (`module`) and the inference mode (`inference`) both need to know whether a forward reads a
parameter's value anywhere but where they perturb it: a read elsewhere would see the unperturbed value. Both watch
the same way, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ValueReads"]

#: Tensor attributes whose reads carry no values (a property like ``.T``, ``.mT`` or ``.data`` does: it is a read).
_METADATA = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "layout",
        "ndim",
        "requires_grad",
        "grad",
        "grad_fn",
        "is_leaf",
        "names",
        "is_cuda",
    }
)


def _metadata_read(func: Any) -> bool:
    """Whether ``func`` is the getter of a Tensor attribute that carries no values (``p.shape``, ``p.dtype``)."""
    if getattr(func, "__name__", "") != "__get__":
        return False
    return getattr(getattr(func, "__self__", None), "__name__", None) in _METADATA


class ValueReads(torch.overrides.TorchFunctionMode):
    """Records the keys of the watched tensors whose values a torch function receives.

    Arguments are searched through lists, tuples and dicts; getters of value-free attributes (``p.shape``) are not
    reads. While ``paused`` is positive nothing is recorded (the caller's own, perturbed use).

    Args:
        watched: ``id(tensor) -> key`` of the tensors to watch.

    Attributes:
        found: The keys of the watched tensors read so far.
        paused: Nesting count of the spans not recorded.
    """

    def __init__(self, watched: dict[int, Any]) -> None:
        super().__init__()
        self.watched, self.found, self.paused = watched, set[Any](), 0

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.watched and not self.paused and not _metadata_read(func):
            stack: list[Any] = [*args, *kwargs.values()]
            while stack:
                a = stack.pop()
                if isinstance(a, (list, tuple)):
                    stack.extend(a)
                elif isinstance(a, dict):
                    stack.extend(a.values())
                elif isinstance(a, Tensor) and id(a) in self.watched:
                    self.found.add(self.watched[id(a)])
        return func(*args, **kwargs)
