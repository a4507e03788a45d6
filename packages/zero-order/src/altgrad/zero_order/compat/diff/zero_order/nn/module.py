"""``torchopt.diff.zero_order.nn.module`` stand-in: `ZeroOrderGradientModule` and `enable_zero_order_gradients`."""

from altgrad.zero_order.module import ZeroOrderGradientModule, enable_zero_order_gradients

__all__ = ["ZeroOrderGradientModule", "enable_zero_order_gradients"]
