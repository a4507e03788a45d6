"""altgrad.zero_order: zero-order (ES / finite-difference) gradients with TorchOpt's API, batched.

``zero_order(...)`` is a drop-in for ``torchopt.diff.zero_order`` and ``ZeroOrderGradientModule`` for
``torchopt.nn.ZeroOrderGradientModule``. As in TorchOpt, the module itself is callable:
``altgrad.zero_order(distribution, ...)`` is ``altgrad.zero_order.zero_order(distribution, ...)``.
For the TorchOpt tutorial namespace (``torchopt.diff``, ``torchopt.nn``, ``torchopt.adam``, ...) see
`compat`.
"""

import sys as _sys
from types import ModuleType as _ModuleType
from typing import Any as _Any

from ._version import __version__
from .decorator import zero_order
from .distributions import NoiseTable, Samplable, SeededDistribution, SeededNormal, SeededRademacher
from .estimators import METHODS, direction_weights
from .gradient import SigmaResolutionWarning, estimate_gradient
from .module import ZeroOrderGradientModule
from .population import VmapFallbackWarning
from .zo_sgd import ZOSGD

__all__ = [
    "METHODS",
    "ZOSGD",
    "NoiseTable",
    "Samplable",
    "SeededDistribution",
    "SeededNormal",
    "SeededRademacher",
    "SigmaResolutionWarning",
    "VmapFallbackWarning",
    "ZeroOrderGradientModule",
    "__version__",
    "direction_weights",
    "estimate_gradient",
    "zero_order",
]


class _CallableModule(_ModuleType):
    """Module type whose instances forward calls to ``zero_order`` (TorchOpt's ``torchopt.diff.zero_order(...)``)."""

    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        return self.zero_order(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
