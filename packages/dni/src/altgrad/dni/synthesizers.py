"""Synthetic-gradient models ("DNI networks"): predict ``∂L/∂h`` from an activation ``h``.

Every shipped synthesizer zero-initialises its final layer (weights and bias, as in the paper), so a fresh
interface sends exactly zero gradient: training starts from "no update" instead of a random one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RNNDNI",
    "Conv2dDNI",
    "DNINetwork",
    "LinearBatchNormDNI",
    "LinearDNI",
    "LinearSigmoidDNI",
]


def _check_size(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _zero_(layer: nn.Module) -> None:
    """Zero the weight and bias of ``layer`` (the paper's initialisation of the last synthesizer layer)."""
    with torch.no_grad():
        for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
            if p is not None:
                p.zero_()


class DNINetwork(nn.Module):
    """Base class for synthesizers (pytorch-dni's ``DNINetwork`` interface).

    A synthesizer maps the activation (with the context, if any, already concatenated along
    :attr:`feature_dim`) to a tensor of the activation's shape: the predicted gradient. Subclasses implement
    ``forward(input, hidden) -> (grad, hidden)``; ``hidden`` is an optional recurrent state that the interface
    keeps (detached) between calls and passes back in. Constructors are called by :class:`~altgrad.dni.DNI` as
    ``cls(input_size=..., hidden_size=..., output_size=..., **dni_params)``.

    Attributes:
        feature_dim: The activation dimension that holds features (``-1`` for linear layers, ``1`` for
            convolutional ``(B, C, H, W)`` maps). ``input_size``/``output_size`` count sizes along it.

    Args:
        input_size: Features the synthesizer reads (activation features plus context features).
        hidden_size: Width of the synthesizer's hidden layers.
        output_size: Features of the predicted gradient (the activation's features).
    """

    feature_dim: ClassVar[int] = -1

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.output_size = _check_size("output_size", output_size)

    def forward(self, input: Tensor, hidden: Any) -> tuple[Tensor, Any]:
        """Predict the gradient for ``input``.

        Args:
            input: The detached activation (plus context), features along :attr:`feature_dim`.
            hidden: The recurrent state returned by the previous call, or ``None``.

        Returns:
            ``(grad, hidden)``: the predicted gradient (same shape as the activation) and the new state.
        """
        raise NotImplementedError


class _MLP(DNINetwork):
    """Shared body of the linear synthesizers: ``num_layers`` hidden blocks and a zero-initialised output."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        num_layers: int,
        bias: bool,
        batch_norm: bool,
    ) -> None:
        super().__init__(input_size, hidden_size, output_size)
        self.num_layers = _check_size("num_layers", num_layers, minimum=0)
        self.bias = bool(bias)
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        width = input_size
        for _ in range(self.num_layers):
            self.layers.append(nn.Linear(width, hidden_size, bias=bias and not batch_norm))
            if batch_norm:
                self.norms.append(nn.BatchNorm1d(hidden_size))
            width = hidden_size
        self.final = nn.Linear(width, output_size, bias=bias)
        _zero_(self.final)

    def _features(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms:
                shape = x.shape
                x = self.norms[i](x.reshape(-1, shape[-1])).reshape(shape)
            x = F.relu(x)
        return self.final(x)

    def forward(self, input: Tensor, hidden: Any = None) -> tuple[Tensor, Any]:
        """Predict the gradient for ``input`` (any leading dimensions, features last).

        Args:
            input: The detached activation (plus context), features along the last dimension.
            hidden: Unused; returned unchanged.

        Returns:
            ``(grad, hidden)``.
        """
        return self._features(input), hidden


class LinearDNI(_MLP):
    """``(Linear → ReLU) × num_layers → Linear`` synthesizer, applied over the last dimension.

    ``num_layers=0`` gives a purely linear synthesizer, which is exact for a quadratic loss and, conditioned
    on labels, is what the paper uses for cDNI.

    Args:
        input_size: Features read (activation plus context).
        hidden_size: Width of the hidden layers.
        output_size: Activation features (size of the predicted gradient's last dimension).
        num_layers: Number of hidden ``Linear → ReLU`` blocks.
        bias: Whether the linear layers have a bias.
    """

    def __init__(
        self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 2, bias: bool = True
    ) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, bias, batch_norm=False)


class LinearBatchNormDNI(_MLP):
    """``(Linear → BatchNorm1d → ReLU) × num_layers → Linear`` synthesizer (the paper's FCN synthesizer).

    Args:
        input_size: Features read (activation plus context).
        hidden_size: Width of the hidden layers.
        output_size: Activation features.
        num_layers: Number of hidden blocks.
        bias: Whether the output layer has a bias (hidden layers rely on the batch-norm shift).
    """

    def __init__(
        self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 2, bias: bool = True
    ) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, bias, batch_norm=True)


class LinearSigmoidDNI(_MLP):
    """``(Linear → ReLU) × num_layers → Linear → sigmoid`` synthesizer for log-loss style gradients.

    The output is ``scale · (2·sigmoid(z) − 1)``: a real pointwise sigmoid on the final linear layer, centred
    so that the zero-initialised synthesizer predicts exactly zero and can predict negative gradients (the
    log-loss gradient ``σ(z) − y`` lies in ``(−1, 1)``; Czarnecki et al. 2017).

    Args:
        input_size: Features read (activation plus context).
        hidden_size: Width of the hidden layers.
        output_size: Activation features.
        num_layers: Number of hidden ``Linear → ReLU`` blocks.
        bias: Whether the linear layers have a bias.
        scale: Bound of the output range ``(−scale, scale)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        num_layers: int = 2,
        bias: bool = True,
        scale: float = 1.0,
    ) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, bias, batch_norm=False)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, input: Tensor, hidden: Any = None) -> tuple[Tensor, Any]:
        """Predict the gradient for ``input``.

        Args:
            input: The detached activation (plus context), features along the last dimension.
            hidden: Unused; returned unchanged.

        Returns:
            ``(grad, hidden)`` with ``grad`` in ``(−scale, scale)``.
        """
        z = self._features(input)
        return (2.0 * self.scale) * torch.sigmoid(z) - self.scale, hidden


class RNNDNI(DNINetwork):
    """Recurrent synthesizer: an LSTM/GRU/RNN over the activation sequence, then a zero-initialised Linear.

    A ``(B, T, F)`` activation (``batch_first=True``) is read as a sequence; a ``(B, F)`` activation is one
    time step, and the recurrent state carries over successive calls (the interface keeps it, detached), so
    the synthesizer can integrate information over a stream of activations.

    Args:
        input_size: Features read (activation plus context).
        hidden_size: Hidden size of the recurrent core.
        output_size: Activation features.
        kind: ``"lstm"``, ``"gru"`` or ``"rnn"``.
        num_layers: Number of stacked recurrent layers.
        batch_first: Whether 3-D activations are ``(B, T, F)`` (else ``(T, B, F)``).
        bias: Whether the layers have biases.
    """

    _KINDS: ClassVar[dict[str, Any]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        kind: str = "lstm",
        num_layers: int = 1,
        batch_first: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__(input_size, hidden_size, output_size)
        if kind not in self._KINDS:
            raise ValueError(f"kind must be one of {sorted(self._KINDS)}, got {kind!r}")
        self.kind = kind
        self.batch_first = bool(batch_first)
        self.rnn = self._KINDS[kind](
            input_size,
            hidden_size,
            num_layers=_check_size("num_layers", num_layers),
            bias=bias,
            batch_first=True,
        )
        self.final = nn.Linear(hidden_size, output_size, bias=bias)
        _zero_(self.final)

    def forward(self, input: Tensor, hidden: Any = None) -> tuple[Tensor, Any]:
        """Run the recurrent core over ``input`` and predict a gradient per step.

        Args:
            input: ``(B, F)`` (one step) or a 3-D sequence, features last.
            hidden: The recurrent state from the previous call, or ``None``.

        Returns:
            ``(grad, hidden)``.
        """
        if input.dim() == 2:
            seq = input.unsqueeze(1)
        elif input.dim() == 3:
            seq = input if self.batch_first else input.transpose(0, 1)
        else:
            raise ValueError(f"RNNDNI expects a 2-D or 3-D activation, got shape {tuple(input.shape)}")
        if hidden is not None and _batch_of(hidden) != seq.shape[0]:
            hidden = None  # the batch size changed: start a fresh state
        out, hidden = self.rnn(seq, hidden)
        grad = self.final(out)
        if input.dim() == 2:
            grad = grad.squeeze(1)
        elif not self.batch_first:
            grad = grad.transpose(0, 1)
        return grad, hidden


def _batch_of(hidden: Any) -> int:
    h = hidden[0] if isinstance(hidden, tuple) else hidden
    return int(h.shape[1])


class _ConvDNI(DNINetwork):
    """Resolution-preserving convolutional synthesizer for ``(B, C, *spatial)`` activations (see subclasses).

    ``(ConvNd → BatchNormNd → ReLU) × num_layers → ConvNd``, every convolution with ``padding="same"`` and no
    pooling (the paper's CNN synthesizer), so the prediction has exactly the activation's shape. Label context
    is broadcast over the spatial dimensions and concatenated on the channels.
    """

    feature_dim: ClassVar[int] = 1
    dims: ClassVar[int] = 2  # spatial dimensions
    _SHAPE: ClassVar[str] = "(B, C, H, W)"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        num_layers: int = 2,
        kernel_size: int = 5,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(input_size, hidden_size, output_size)
        self.num_layers = _check_size("num_layers", num_layers, minimum=0)
        self.kernel_size = _check_size("kernel_size", kernel_size)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.dims - 1]
        norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[self.dims - 1]
        blocks: list[nn.Module] = []
        width = input_size
        for _ in range(self.num_layers):
            blocks.append(conv(width, hidden_size, kernel_size, padding="same", bias=not batch_norm))
            if batch_norm:
                blocks.append(norm(hidden_size))
            blocks.append(nn.ReLU())
            width = hidden_size
        self.body = nn.Sequential(*blocks)
        self.final = conv(width, output_size, kernel_size, padding="same")
        _zero_(self.final)

    def forward(self, input: Tensor, hidden: Any = None) -> tuple[Tensor, Any]:
        """Predict the gradient for a ``(B, C, *spatial)`` activation.

        Args:
            input: The detached activation (plus broadcast context channels).
            hidden: Unused; returned unchanged.

        Returns:
            ``(grad, hidden)`` with ``grad`` of the activation's shape, ``output_size`` channels.
        """
        if input.dim() != self.dims + 2:
            raise ValueError(
                f"{type(self).__name__} expects a {self._SHAPE} activation, got shape {tuple(input.shape)}"
            )
        return self.final(self.body(input)), hidden


class Conv1dDNI(_ConvDNI):
    """:class:`Conv2dDNI` for ``(B, C, L)`` activations (``nn.Conv1d`` feature maps: audio, sequences).

    ``(Conv1d → BatchNorm1d → ReLU) × num_layers → Conv1d``, ``padding="same"``; same arguments as
    :class:`Conv2dDNI`.
    """

    dims: ClassVar[int] = 1
    _SHAPE: ClassVar[str] = "(B, C, L)"


class Conv2dDNI(_ConvDNI):
    """Resolution-preserving convolutional synthesizer for ``(B, C, H, W)`` activations.

    ``(Conv2d → BatchNorm2d → ReLU) × num_layers → Conv2d``, every convolution with ``padding="same"`` and no
    pooling (the paper's CNN synthesizer), so the prediction has exactly the activation's shape. Label context
    is broadcast spatially and concatenated on the channels.

    Args:
        input_size: Input channels (activation channels plus context features).
        hidden_size: Channels of the hidden convolutions.
        output_size: Activation channels.
        num_layers: Number of hidden blocks.
        kernel_size: Convolution kernel size (stride 1, "same" padding).
        batch_norm: Whether hidden blocks use ``BatchNorm2d``.
    """

    dims: ClassVar[int] = 2
    _SHAPE: ClassVar[str] = "(B, C, H, W)"


class Conv3dDNI(_ConvDNI):
    """:class:`Conv2dDNI` for ``(B, C, D, H, W)`` activations (``nn.Conv3d`` feature maps: video, volumes).

    ``(Conv3d → BatchNorm3d → ReLU) × num_layers → Conv3d``, ``padding="same"``; same arguments as
    :class:`Conv2dDNI`.
    """

    dims: ClassVar[int] = 3
    _SHAPE: ClassVar[str] = "(B, C, D, H, W)"
