"""``torchopt.diff.zero_order.nn`` stand-in."""

from altgrad.zero_order.module import ZeroOrderGradientModule

from . import module

__all__ = ["ZeroOrderGradientModule", "module"]
