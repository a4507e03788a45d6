"""Exception types that keep TorchOpt's error contract while being more specific.

TorchOpt raises a bare ``AssertionError`` for an unknown ``method`` and, depending on the release, a
``RuntimeError`` (0.7.3) or a ``TypeError`` (main) for a non-tensor output. The classes below subclass
both the historical type and the natural one, so ``except`` clauses written for either keep working.
"""

from __future__ import annotations

__all__ = ["ArgnumsError", "MethodError", "OutputTypeError"]


class MethodError(ValueError, AssertionError):
    """An unknown estimator ``method`` (TorchOpt raised a bare ``AssertionError``)."""


class OutputTypeError(TypeError, RuntimeError):
    """The function returned something that is not a tensor.

    TorchOpt 0.7.3 raises ``RuntimeError`` and TorchOpt main raises ``TypeError``; this is both.
    """


class ArgnumsError(ValueError, IndexError):
    """``argnums`` does not fit the positional arguments of the call (TorchOpt raised ``IndexError``)."""
