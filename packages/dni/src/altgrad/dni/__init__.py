"""altgrad.dni: decoupled neural interfaces (synthetic gradients) for PyTorch.

* :class:`DNI` wraps a whole model (every parameterised leaf) or one module, pytorch-dni style.
* :class:`BackwardInterface` is the primitive it is built on: a synthetic-gradient boundary on any activation,
  with feed-forward (``iface(h)``) and truncated-BPTT (``trigger``/``inject``) use.
* :class:`ForwardInterface` (synthetic inputs, forward unlocking) and :class:`BidirectionalInterface`
  (synthetic inputs and gradients: the complete unlock).
* :class:`DecoupledPipeline`: one stage per process over ``torch.distributed``, each updated at once from its
  synthetic gradient (:mod:`altgrad.dni.pipeline`).
* :mod:`altgrad.dni.compat`: koz4k/dni-pytorch's API (``import altgrad.dni.compat as dni``).
* Synthesizers: :class:`DNINetwork` (base class), :class:`LinearDNI`, :class:`LinearSigmoidDNI`,
  :class:`LinearBatchNormDNI`, :class:`RNNDNI`, :class:`Conv1dDNI`, :class:`Conv2dDNI`, :class:`Conv3dDNI`.
"""

from ._version import __version__
from .forward import BidirectionalInterface, ForwardInterface
from .interface import MODES, BackwardInterface
from .pipeline import DecoupledPipeline, PipelineError, split_sequential
from .synthesizers import (
    RNNDNI,
    Conv1dDNI,
    Conv2dDNI,
    Conv3dDNI,
    DNINetwork,
    LinearBatchNormDNI,
    LinearDNI,
    LinearSigmoidDNI,
)
from .util import detach_all, get_padding
from .wrapper import _DNI as _DNI  # pytorch-dni exports it; its tasks import it
from .wrapper import DNI

__all__ = [
    "DNI",
    "MODES",
    "RNNDNI",
    "BackwardInterface",
    "BidirectionalInterface",
    "Conv1dDNI",
    "Conv2dDNI",
    "Conv3dDNI",
    "DNINetwork",
    "DecoupledPipeline",
    "ForwardInterface",
    "LinearBatchNormDNI",
    "LinearDNI",
    "LinearSigmoidDNI",
    "PipelineError",
    "__version__",
    "detach_all",
    "get_padding",
    "split_sequential",
]
