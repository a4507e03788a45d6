"""``torchopt.nn`` stand-in: exposes :class:`~altgrad.zero_order.ZeroOrderGradientModule`."""

from altgrad.zero_order.module import ZeroOrderGradientModule

__all__ = ["ZeroOrderGradientModule"]
