"""Population forwards of ``nn.Embedding``, ``nn.LayerNorm`` and ``nn.Conv1d`` (modules perturbed in place).

Each class is the original module class plus :class:`~altgrad.es_layers.units.UnitHost`: ``perturb`` swaps the
class of the existing object, so parameters, buffers and ``state_dict`` keys stay the same. Outside the population
(``perturbed_flag`` off) the original forward runs. The population dimension is ``population_dim`` (0, or 1 inside a
sequence-first transformer layer), holding ``repeat_size * n`` rows with the member index fastest; as for a Linear,
an input with no dimension before it besides its features (indices ``(B,)``, a ``(B, H)`` state) has it on dim 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as EF
from .units import UnitHost, unit_conv1d, unit_dense, unit_rows

__all__ = ["PerturbedConv1d", "PerturbedEmbedding", "PerturbedLayerNorm"]


def _population_dim(host: UnitHost, x: Tensor, features: int) -> int:
    """The dimension of ``x`` holding the population: ``population_dim``, or 0 when ``x`` has no dimension in front
    of it besides its ``features`` trailing ones (a ``(B, H)`` state after a sequence-first LSTM), as for a Linear."""
    d = host.population_dim
    return d if x.dim() > d + features else 0


class PerturbedEmbedding(UnitHost, nn.Embedding):
    """``nn.Embedding`` whose population looks up rows of ``W + c E_k`` (low rank: ``A_k[idx] B_kᵀ``; Flipout:
    ``r_k[idx] E[idx] ∘ s_k``; IID: ``E_k[idx]``). As in backprop, the ``padding_idx`` row takes no part: every
    member looks it up unperturbed, and its ES gradient is zero unless another use (a tied head) reads it."""

    es_kind = "embedding"

    def forward(self, input: Tensor) -> Tensor:
        """The embedding of ``input``, or the population's when ``perturbed_flag`` is set.

        Args:
            input: Indices ``(repeat_size * n, *)`` (population on ``population_dim``).

        Returns:
            ``(*input.shape, embedding_dim)``.
        """
        if not self.perturbed_flag:
            return super().forward(input)
        if input.dim() < 1:
            raise ValueError(f"{type(self).__name__}: the population needs a batched input, got a scalar")
        d = _population_dim(self, input, 0)
        idx = input.movedim(d, 0)
        unit = self._es_units[0]
        out = unit_rows(unit, idx)
        if self.padding_idx is not None and not unit.es_explicit:  # the padding row is never perturbed
            pad = (idx == self.padding_idx).unsqueeze(-1)
            out = torch.where(pad, self.weight[self.padding_idx].to(out.dtype), out)
        return out.movedim(0, d)


class PerturbedLayerNorm(UnitHost, nn.LayerNorm):
    """``nn.LayerNorm`` whose population applies ``(W + c E_k) ∘ x̂ + b + c ε_k`` to the normalised input."""

    es_kind = "layer_norm"

    def forward(self, input: Tensor) -> Tensor:
        """Layer normalisation, or the population's when ``perturbed_flag`` is set.

        Args:
            input: ``(..., *normalized_shape)`` with the population on ``population_dim``.

        Returns:
            Same shape as ``input``.
        """
        if not self.perturbed_flag:
            return super().forward(input)
        unit = self._es_units[0]
        d = _population_dim(self, input, len(self.normalized_shape))
        x = input.movedim(d, 0)
        unit._repeats(x.shape)
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        noise = unit._current_noise()
        out = EF.perturbed_affine(
            y, self.weight, self.bias, unit_dense(unit), noise.get("bias"), antithetic=unit.antithetic
        )
        return out.movedim(0, d)


class PerturbedConv1d(UnitHost, nn.Conv1d):
    """``nn.Conv1d`` whose population runs the Conv2d path of its mode on a height-1 view."""

    es_kind = "conv1d"

    def forward(self, input: Tensor) -> Tensor:
        """The convolution, or the population's when ``perturbed_flag`` is set.

        Args:
            input: ``(repeat_size * n, in_channels, L)``, member index fastest.

        Returns:
            ``(repeat_size * n, out_channels, L_out)``.
        """
        if not self.perturbed_flag:
            return super().forward(input)
        if input.dim() != 3 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected a 3-D input (repeat_size * n, {self.in_channels}, L), "
                f"got shape {tuple(input.shape)}"
            )
        padding = self.padding if isinstance(self.padding, str) else self.padding[0]
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return unit_conv1d(self._es_units[0], input, self.stride[0], padding, self.dilation[0], self.groups)
