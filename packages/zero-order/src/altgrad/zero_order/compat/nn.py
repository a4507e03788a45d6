"""``torchopt.nn`` stand-in: exposes `ZeroOrderGradientModule`."""

from altgrad.zero_order.module import ZeroOrderGradientModule

__all__ = ["ZeroOrderGradientModule"]
