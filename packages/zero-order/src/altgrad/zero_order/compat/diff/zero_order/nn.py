"""``torchopt.diff.zero_order.nn`` stand-in."""

from altgrad.zero_order.module import ZeroOrderGradientModule

__all__ = ["ZeroOrderGradientModule"]
