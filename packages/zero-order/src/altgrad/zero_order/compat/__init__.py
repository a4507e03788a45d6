"""A TorchOpt-shaped namespace, so TorchOpt zero-order code runs with one import changed.

Replace ``import torchopt`` by ``import altgrad.zero_order.compat as torchopt`` and the zero-order tutorial runs
unchanged: ``torchopt.diff.zero_order(...)``, ``torchopt.diff.zero_order.zero_order``,
``torchopt.nn.ZeroOrderGradientModule``, ``torchopt.diff.zero_order.nn.ZeroOrderGradientModule`` and the
optimizer helpers the tutorial uses (``torchopt.adam``, ``torchopt.apply_updates``, ``torchopt.Adam``).
Only these names are provided; the rest of TorchOpt (implicit differentiation, meta-optimizers, ...) is not.
"""

from . import diff, nn, typing
from ._optim import Adam, GradientTransformation, adam, apply_updates

__all__ = ["Adam", "GradientTransformation", "adam", "apply_updates", "diff", "nn", "typing"]
