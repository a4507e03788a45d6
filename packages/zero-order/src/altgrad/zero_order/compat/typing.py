"""``torchopt.typing`` stand-in: only the zero-order names (``Samplable``, ``SampleFunc``)."""

from collections.abc import Callable, Sequence

from torch import Size, Tensor

from altgrad.zero_order.distributions import Samplable

#: A callable sampler ``fn(sample_shape)`` (TorchOpt's ``SampleFunc``).
SampleFunc = Callable[[Size], Tensor | Sequence[float]]

__all__ = ["Samplable", "SampleFunc"]
