"""altgrad.discounted_cumsum: fast, differentiable discounted cumulative sums for PyTorch.

``discounted_cumsum_right`` / ``discounted_cumsum_left`` are drop-in replacements for torch-discounted-cumsum;
``discounted_cumsum`` is the general form (any dim, per-row or per-element discounts, resets, initial value);
``discounted_returns`` and ``generalized_advantage_estimate`` are the RL helpers built on it.
"""

from ._native import cpu_available, cpu_isa, cuda_available, supported_cpu_isas
from ._version import __version__
from .core import discounted_cumsum, discounted_cumsum_left, discounted_cumsum_right
from .reference import discounted_cumsum_reference
from .rl import discounted_returns, generalized_advantage_estimate

__all__ = [
    "__version__",
    "cpu_available",
    "cpu_isa",
    "cuda_available",
    "discounted_cumsum",
    "discounted_cumsum_left",
    "discounted_cumsum_reference",
    "discounted_cumsum_right",
    "discounted_returns",
    "generalized_advantage_estimate",
    "supported_cpu_isas",
]
