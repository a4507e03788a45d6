"""``torchopt.diff.zero_order`` stand-in: callable like TorchOpt's module (``zero_order(...)``)."""

import sys as _sys
from types import ModuleType as _ModuleType
from typing import Any as _Any

from altgrad.zero_order.decorator import zero_order
from altgrad.zero_order.module import ZeroOrderGradientModule

from . import decorator, nn

__all__ = ["ZeroOrderGradientModule", "decorator", "nn", "zero_order"]


class _CallableModule(_ModuleType):
    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        return self.zero_order(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
