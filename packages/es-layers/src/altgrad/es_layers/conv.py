"""Perturbed ``nn.Conv2d`` layers: the whole population in one batched forward.

Input layout (NESgpu): ``(repeat_size * n, C_in, H, W)`` with the member index fastest (see
:mod:`altgrad.es_layers.linear`). Per-member convolutions use the grouped-convolution trick: the input viewed as
``(R, n·C_in, H, W)`` convolved with ``n`` stacked filter banks and ``groups = n·groups``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as EF
from .base import Perturbed
from .modes import FlipoutNoise, IIDNoise, LowRankNoise, PermutedNoise

__all__ = ["FlipoutConv2d", "LowRankConv2d", "PermutedConv2d", "PerturbedConv2d", "SyntheticConv2d"]


class _PerturbedConvBase(Perturbed, nn.Conv2d):
    """Shared forward plumbing for the perturbed Conv2d layers."""

    es_kind = "conv2d"

    def _setup(
        self,
        in_channels,
        out_channels,
        kernel_size,
        directions,
        stride,
        padding,
        dilation,
        groups,
        bias,
        padding_mode,
        antithetic,
        noise_scale,
        seed,
        device,
        dtype,
        options,
    ):
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_perturbed(directions, antithetic, noise_scale, seed, options)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._perturbed_repr()}"

    def forward(self, input: Tensor) -> Tensor:
        """Unperturbed convolution, or the population's outputs when ``perturbed_flag`` is set.

        Args:
            input: ``(repeat_size * n, in_channels, H, W)``, member index fastest.

        Returns:
            ``(repeat_size * n, out_channels, H_out, W_out)``.
        """
        if not self.perturbed_flag:
            return super().forward(input)
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected a 4-D input (repeat_size * n, {self.in_channels}, H, W), "
                f"got shape {tuple(input.shape)}"
            )
        noise = self._current_noise()
        self._repeats(input.shape)
        padding: str | tuple[int, ...] | int = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        conv = {"stride": self.stride, "padding": padding, "dilation": self.dilation}
        return self._population_forward(input, noise, conv)

    def _population_forward(self, x: Tensor, noise: dict[str, Tensor], conv: dict) -> Tensor:
        """The mode's batched forward (one call into :mod:`altgrad.es_layers.functional`)."""
        raise NotImplementedError


class PerturbedConv2d(IIDNoise, _PerturbedConvBase):
    """Conv2d with an independent Gaussian filter perturbation per member (NESgpu's ``PerturbedConv2d``).

    One grouped convolution with ``groups = directions·groups`` over the stored ``N`` filter banks.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels.
        kernel_size: Size of the convolving kernel.
        directions: Population size ``N``.
        stride: Stride of the convolution.
        padding: Padding added to all four sides.
        dilation: Spacing between kernel elements.
        groups: Number of blocked connections from input to output channels.
        bias: If true, the layer has a (perturbed) bias.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        directions: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        antithetic: bool = True,
        options: dict | None = None,
        padding_mode: str = "zeros",
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_channels, out_channels, kernel_size, directions, stride, padding, dilation, groups, bias,
            padding_mode, antithetic, noise_scale, seed, device, dtype, options,
        )  # fmt: skip

    def _population_forward(self, x, noise, conv):
        return EF.perturbed_conv2d(
            x, self.weight, self.bias, noise["weight"], noise.get("bias"), antithetic=self.antithetic,
            groups=self.groups, **conv,
        )  # fmt: skip


class PermutedConv2d(PermutedNoise, _PerturbedConvBase):
    """Conv2d with one shared filter bank whose channels are permuted per member (NESgpu's ``PermutedConv2d``).

    Input-channel permutation is an ``index_select`` of the ``(R, n·C_in, H, W)`` view; one ordinary convolution
    with the shared noise; output-channel permutation is an index gather. ``groups`` must be 1.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels.
        kernel_size: Size of the convolving kernel.
        directions: Population size ``N``.
        stride: Stride of the convolution.
        padding: Padding added to all four sides.
        dilation: Spacing between kernel elements.
        groups: Must be 1.
        bias: If true, the layer has a (perturbed) bias.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        permutation: ``"in"``, ``"out"``, ``"both"`` or ``"auto"`` (channels; NESgpu's rule).
        in_sparsity: Input channels kept per member: ``0`` = all, a float = fraction, an int = count.
        out_sparsity: Output channels kept per member, as ``in_sparsity``.
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        directions: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        antithetic: bool = True,
        options: dict | None = None,
        padding_mode: str = "zeros",
        permutation: str = "auto",
        in_sparsity: int | float = 0,
        out_sparsity: int | float = 0,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_channels, out_channels, kernel_size, directions, stride, padding, dilation, groups, bias,
            padding_mode, antithetic, noise_scale, seed, device, dtype, options,
        )  # fmt: skip
        self._init_permuted(permutation, in_sparsity, out_sparsity)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, permutation={self.permutation!r}, in_sparsity={self.in_sparsity}, "
            f"out_sparsity={self.out_sparsity}"
        )

    def _population_forward(self, x, noise, conv):
        return EF.permuted_conv2d(
            x, self.weight, self.bias, noise["shared_weight"], noise.get("in_idx"), noise.get("out_idx"),
            noise.get("bias"), antithetic=self.antithetic, out_inv=noise.get("out_inv"), **conv,
        )  # fmt: skip


class FlipoutConv2d(FlipoutNoise, _PerturbedConvBase):
    """Conv2d with one shared filter bank and per-member channel sign flips (Flipout; NESgpu's ``SyntheticConv2d``).

    Member ``k`` uses ``E_k = diag(r_k) E diag(s_k)`` over output/input channels: one extra ordinary convolution
    of ``x ∘ s_k``, then ``∘ r_k``. Works with ``groups > 1``.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels.
        kernel_size: Size of the convolving kernel.
        directions: Population size ``N``.
        stride: Stride of the convolution.
        padding: Padding added to all four sides.
        dilation: Spacing between kernel elements.
        groups: Number of blocked connections from input to output channels.
        bias: If true, the layer has a (perturbed) bias.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        flip: ``"in"``, ``"out"``, ``"both"`` or ``"auto"`` (channels; NESgpu's rule).
        in_sparsity: Must be 0 (NESgpu's signature; sparse sign flips are refused there too).
        out_sparsity: Must be 0.
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        directions: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        antithetic: bool = True,
        options: dict | None = None,
        padding_mode: str = "zeros",
        flip: str = "auto",
        in_sparsity: int | float = 0,
        out_sparsity: int | float = 0,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_channels, out_channels, kernel_size, directions, stride, padding, dilation, groups, bias,
            padding_mode, antithetic, noise_scale, seed, device, dtype, options,
        )  # fmt: skip
        self._init_flipout(flip, in_sparsity, out_sparsity)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, flip={self.flip!r}"

    def _population_forward(self, x, noise, conv):
        return EF.flipout_conv2d(
            x, self.weight, self.bias, noise["shared_weight"], noise.get("in_sign"), noise.get("out_sign"),
            noise.get("bias"), antithetic=self.antithetic, groups=self.groups, **conv,
        )  # fmt: skip


#: NESgpu's name for the sign-flip convolution.
SyntheticConv2d = FlipoutConv2d


class LowRankConv2d(LowRankNoise, _PerturbedConvBase):
    """Conv2d with rank-``r`` filter perturbations ``E_k = σ/√r · A_k B_kᵀ`` (EGGROLL for convolutions).

    ``B_k`` holds ``r`` filters over ``(C_in, kh, kw)`` and ``A_k`` mixes them into the ``C_out`` outputs: one
    grouped convolution producing ``r`` channels per member plus a per-member ``1×1`` mixing. ``groups`` must be 1.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels.
        kernel_size: Size of the convolving kernel.
        directions: Population size ``N``.
        stride: Stride of the convolution.
        padding: Padding added to all four sides.
        dilation: Spacing between kernel elements.
        groups: Must be 1.
        bias: If true, the layer has a (perturbed) bias.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        rank: Rank ``r`` of each perturbation.
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        directions: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        antithetic: bool = True,
        options: dict | None = None,
        padding_mode: str = "zeros",
        rank: int = 1,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_channels, out_channels, kernel_size, directions, stride, padding, dilation, groups, bias,
            padding_mode, antithetic, noise_scale, seed, device, dtype, options,
        )  # fmt: skip
        self._init_lowrank(rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"

    def _population_forward(self, x, noise, conv):
        return EF.lowrank_conv2d(
            x, self.weight, self.bias, noise["A"], noise["B"], noise.get("bias"), antithetic=self.antithetic,
            **conv,
        )  # fmt: skip
