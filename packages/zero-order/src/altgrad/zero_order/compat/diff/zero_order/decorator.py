"""``torchopt.diff.zero_order.decorator`` stand-in: the `zero_order` decorator factory."""

from altgrad.zero_order.decorator import zero_order

__all__ = ["zero_order"]
