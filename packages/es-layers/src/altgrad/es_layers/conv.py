"""Perturbed ``nn.Conv2d`` layers: the whole population in one batched forward.

Input layout (NESgpu): ``(repeat_size * n, C_in, H, W)`` with the member index fastest (see
:mod:`altgrad.es_layers.linear`). Per-member convolutions use the grouped-convolution trick: the input viewed as
``(R, n·C_in, H, W)`` convolved with ``n`` stacked filter banks and ``groups = n·groups``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Perturbed
from .modes import FlipoutNoise, IIDNoise, LowRankNoise, PermutedNoise

__all__ = ["FlipoutConv2d", "LowRankConv2d", "PermutedConv2d", "PerturbedConv2d", "SyntheticConv2d"]


class _PerturbedConvBase(Perturbed, nn.Conv2d):
    """Shared forward plumbing for the perturbed Conv2d layers."""

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
        self._init_perturbed(directions, antithetic, noise_scale, seed)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._perturbed_repr()}"

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        padding = 0 if self.padding_mode != "zeros" else self.padding
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, groups)

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
        reps = self._repeats(input.shape)
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        out = self._conv(input, self.weight, self.bias, self.groups)
        n = self.members.numel()
        signs = self._signs(reps, out.dtype, out.device)
        x5 = input.view(reps, n, *input.shape[1:])
        p = self._perturbation(x5, noise)  # (R, n, C_out, H', W')
        if signs is not None:
            p = p * signs.view(-1, 1, 1, 1, 1)
        out.view(p.shape).add_(p)
        return out

    def _perturbation(self, x5: Tensor, noise: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _bias_noise(self, noise: dict[str, Tensor]) -> Tensor | None:
        return noise["bias"][None, :, :, None, None] if self.bias is not None else None


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
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        antithetic: Negate the noise in the second half of an even number of repeats.
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
        padding_mode: str = "zeros",
        antithetic: bool = True,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_channels, out_channels, kernel_size, directions, stride, padding, dilation, groups, bias,
            padding_mode, antithetic, noise_scale, seed, device, dtype,
        )  # fmt: skip

    def _perturbation(self, x5, noise):
        reps, n = x5.shape[:2]
        e = noise["weight"]
        bias = noise["bias"].reshape(-1) if self.bias is not None else None
        xv = x5.reshape(reps, n * self.in_channels, *x5.shape[3:])
        p = self._conv(xv, e.reshape(-1, *e.shape[2:]), bias, self.groups * n)
        return p.view(reps, n, self.out_channels, *p.shape[2:])


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
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        antithetic: Negate the noise in the second half of an even number of repeats.
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
        padding_mode: str = "zeros",
        antithetic: bool = True,
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
            padding_mode, antithetic, noise_scale, seed, device, dtype,
        )  # fmt: skip
        self._init_permuted(permutation, in_sparsity, out_sparsity)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, permutation={self.permutation!r}, in_sparsity={self.in_sparsity}, "
            f"out_sparsity={self.out_sparsity}"
        )

    def _perturbation(self, x5, noise):
        reps, n, c = x5.shape[:3]
        hw = x5.shape[3:]
        e = noise["shared_weight"]
        if self.permute_inputs:
            offsets = (noise["in_idx"] + torch.arange(n, device=x5.device)[:, None] * c).reshape(-1)
            xg = x5.reshape(reps, n * c, *hw).index_select(1, offsets)
            xg = xg.view(reps * n, self.in_sparsity, *hw)
        else:
            xg = x5.reshape(reps * n, c, *hw)
        v = self._conv(xg, e, None, 1)  # (R*n, m_sp, H', W')
        out_hw = v.shape[2:]
        if self.permute_outputs:
            v = F.pad(v.view(reps, n, self.out_sparsity, -1), (0, 0, 0, 1))  # zero channel at the end
            offsets = noise["out_inv"] + torch.arange(n, device=x5.device)[:, None] * (self.out_sparsity + 1)
            v = v.view(reps, n * (self.out_sparsity + 1), -1).index_select(1, offsets.reshape(-1))
        v = v.view(reps, n, self.out_channels, *out_hw)
        eps = self._bias_noise(noise)
        return v if eps is None else v.add_(eps)


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
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        flip: ``"in"``, ``"out"``, ``"both"`` or ``"auto"`` (channels; NESgpu's rule).
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
        padding_mode: str = "zeros",
        antithetic: bool = True,
        flip: str = "auto",
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_channels, out_channels, kernel_size, directions, stride, padding, dilation, groups, bias,
            padding_mode, antithetic, noise_scale, seed, device, dtype,
        )  # fmt: skip
        self._init_flipout(flip)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, flip={self.flip!r}"

    def _perturbation(self, x5, noise):
        reps, n = x5.shape[:2]
        xs = x5 * noise["in_sign"][None, :, :, None, None] if self.flip_inputs else x5
        v = self._conv(xs.reshape(reps * n, *x5.shape[2:]), noise["shared_weight"], None, self.groups)
        v = v.view(reps, n, *v.shape[1:])
        if self.flip_outputs:
            v *= noise["out_sign"][None, :, :, None, None]
        eps = self._bias_noise(noise)
        return v if eps is None else v.add_(eps)


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
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        rank: Rank ``r`` of each perturbation.
        antithetic: Negate the noise in the second half of an even number of repeats.
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
        padding_mode: str = "zeros",
        rank: int = 1,
        antithetic: bool = True,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_channels, out_channels, kernel_size, directions, stride, padding, dilation, groups, bias,
            padding_mode, antithetic, noise_scale, seed, device, dtype,
        )  # fmt: skip
        self._init_lowrank(rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"

    def _perturbation(self, x5, noise):
        reps, n, c = x5.shape[:3]
        r = self.rank
        filters = noise["B"].transpose(1, 2).reshape(n * r, c, *self.kernel_size)
        h = self._conv(x5.reshape(reps, n * c, *x5.shape[3:]), filters, None, n)  # (R, n*r, H', W')
        out_hw = h.shape[2:]
        a = noise["A"]  # (n, m, r)
        if r == 1:
            v = h.view(reps, n, 1, *out_hw) * a.view(1, n, -1, 1, 1)
        else:
            hm = h.view(reps, n, r, -1).permute(1, 2, 0, 3).reshape(n, r, -1)  # (n, r, R*L)
            v = torch.bmm(a, hm).view(n, -1, reps, *out_hw).permute(2, 0, 1, 3, 4)
        eps = self._bias_noise(noise)
        return v if eps is None else v + eps
