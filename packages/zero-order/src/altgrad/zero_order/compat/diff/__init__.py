"""``torchopt.diff`` stand-in: only ``zero_order`` is provided."""

from . import zero_order

__all__ = ["zero_order"]
