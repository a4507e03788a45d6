"""AddSign and PowerSign optimizers with TensorFlow's internal sign decays, as torch.optim optimizers.

Examples:
    >>> import torch
    >>> from altgrad.sign_optim import AddSign, LinearInternalDecay
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = AddSign(model.parameters(), lr=1e-3, sign_internal_decay=LinearInternalDecay(100))
"""

from ._version import __version__
from .addsign import AddSign
from .powersign import PowerSign
from .sign_internal_decay import (
    CosineInternalDecay,
    LinearInternalDecay,
    RestartCosineInternalDecay,
    SignInternalDecay,
    decay_from_dict,
)

__all__ = [
    "AddSign",
    "CosineInternalDecay",
    "LinearInternalDecay",
    "PowerSign",
    "RestartCosineInternalDecay",
    "SignInternalDecay",
    "__version__",
    "decay_from_dict",
]
