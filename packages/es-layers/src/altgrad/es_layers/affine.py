"""``PerturbedAffine``: an elementwise affine layer ``x ∘ W + b`` with IID per-member noise (NESgpu's name)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import functional as EF
from .base import Perturbed
from .modes import IIDNoise

__all__ = ["PerturbedAffine"]


class PerturbedAffine(IIDNoise, Perturbed, nn.Module):
    """Elementwise affine ``x ∘ W + b`` (``W`` starts at ones, ``b`` at zeros) with a Gaussian perturbation per member.

    NESgpu places it after a normalisation without affine parameters, for example
    ``nn.BatchNorm2d(C, affine=False)`` followed by ``PerturbedAffine((C, 1, 1), directions)``.

    Args:
        normalized_shape: Shape of ``W`` and ``b``; broadcast against the trailing dimensions of each row.
        directions: Population size ``N``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (its default ``{"direct": True}`` included); accepted, no effect.
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Example:
        >>> layer = PerturbedAffine((3, 1, 1), directions=4, seed=0)
        >>> layer.set_noise()
        >>> layer.perturbed_flag = True
        >>> layer(torch.randn(8, 3, 5, 5)).shape
        torch.Size([8, 3, 5, 5])
    """

    es_kind = "affine"

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        directions: int,
        antithetic: bool = True,
        options: dict | None = None,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(
                f"normalized_shape must be a positive int or a tuple of them, got {normalized_shape!r}"
            )
        self.normalized_shape = shape
        self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self._init_perturbed(directions, antithetic, noise_scale, seed, options)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, {self._perturbed_repr()}"

    def forward(self, input: Tensor) -> Tensor:
        """``input ∘ W + b``, or the population's outputs when ``perturbed_flag`` is set.

        Args:
            input: ``(repeat_size * n, *rest)`` with ``W`` broadcastable to ``rest``, member index fastest.

        Returns:
            Same shape as ``input``.
        """
        if not self.perturbed_flag:
            return torch.addcmul(self.bias, input, self.weight)
        noise = self._current_noise()
        self._repeats(input.shape)
        return EF.perturbed_affine(
            input, self.weight, self.bias, noise["weight"], noise.get("bias"), antithetic=self.antithetic
        )
