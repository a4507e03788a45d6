"""Perturbed ``nn.Linear`` layers: the whole population in one batched forward.

Input layout (NESgpu): ``(repeat_size * n, *, in_features)`` where ``n`` is the number of members evaluated here
(``directions`` unless sharded) and **the member index varies fastest**: row ``i`` belongs to member
``members[i % n]`` and repeat ``i // n``. With ``antithetic=True`` and an even number of repeats, repeats in the
second half use ``-E_k``. Every forward is ``x Wᵀ + b`` (one GEMM) plus a structured perturbation term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as EF
from .base import Perturbed
from .modes import FlipoutNoise, IIDNoise, LowRankNoise, PermutedNoise, SparseNoise

__all__ = [
    "FlipoutLinear",
    "LowRankLinear",
    "PermutedLinear",
    "PerturbedLinear",
    "SparsePerturbedLinear",
    "SyntheticLinear",
]


class _PerturbedLinearBase(Perturbed, nn.Linear):
    """Shared forward plumbing for the perturbed Linear layers.

    Attributes:
        population_dim: The input dimension holding the population (0; ``perturb`` sets 1 for the Linears of a
            sequence-first transformer layer, whose inputs are ``(T, repeat_size * n, features)``).
    """

    es_kind = "linear"
    population_dim = 0

    def _setup(
        self,
        in_features,
        out_features,
        directions,
        bias,
        antithetic,
        noise_scale,
        seed,
        device,
        dtype,
        options,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_perturbed(directions, antithetic, noise_scale, seed, options)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._perturbed_repr()}"

    def forward(self, input: Tensor) -> Tensor:
        """Unperturbed ``x Wᵀ + b``, or the population's outputs when ``perturbed_flag`` is set.

        Args:
            input: ``(repeat_size * n, *, in_features)``, member index fastest.

        Returns:
            ``(repeat_size * n, *, out_features)``.
        """
        if not self.perturbed_flag:
            return F.linear(input, self.weight, self.bias)
        if self.population_dim and input.dim() > self.population_dim + 1:
            x = input.movedim(self.population_dim, 0)
            return self._population_checked(x).movedim(0, self.population_dim)
        return self._population_checked(input)

    def _population_checked(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (repeat_size * n, *, {self.in_features}), "
                f"got {tuple(input.shape)}"
            )
        noise = self._current_noise()
        self._repeats(input.shape)
        return self._population_forward(input, noise)

    def _population_forward(self, x: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """The mode's batched forward (one call into :mod:`altgrad.es_layers.functional`)."""
        raise NotImplementedError


class PerturbedLinear(IIDNoise, _PerturbedLinearBase):
    """Linear layer with an independent Gaussian perturbation per member (NESgpu's ``PerturbedLinear``).

    The perturbation term is a batched matmul over the stored ``N·out·in`` noise: exact IID ES, but memory bound.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        directions: Population size ``N``.
        bias: If true, the layer has a (perturbed) bias.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        noise_scale: ``σ``, the standard deviation of the noise entries.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Example:
        >>> layer = PerturbedLinear(4, 3, directions=8, seed=0)
        >>> layer.set_noise()
        >>> layer.perturbed_flag = True
        >>> layer(torch.randn(16, 4)).shape  # 2 repeats x 8 members
        torch.Size([16, 3])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        directions: int,
        bias: bool = True,
        antithetic: bool = True,
        options: dict | None = None,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_features, out_features, directions, bias, antithetic, noise_scale, seed, device, dtype, options
        )

    def _population_forward(self, x, noise):
        return EF.perturbed_linear(
            x, self.weight, self.bias, noise["weight"], noise.get("bias"), antithetic=self.antithetic
        )


class SparsePerturbedLinear(SparseNoise, _PerturbedLinearBase):
    """Linear layer whose member ``k`` perturbs only ``sparsity`` random input columns (NESgpu, with an update).

    Entries are ``N(0, σ²·in/sparsity)`` so that ``E_k`` has the expected norm of an IID perturbation.
    The forward gathers ``sparsity`` inputs per member and does a batched ``(R, s)·(s, out)`` product.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        directions: Population size ``N``.
        bias: If true, the layer has a (perturbed) bias.
        sparsity: Non-zero input columns per member (``k``); ``"auto"`` = ``max(1, in // directions)``.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        directions: int,
        bias: bool = True,
        sparsity: int | str = "auto",
        antithetic: bool = True,
        options: dict | None = None,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_features, out_features, directions, bias, antithetic, noise_scale, seed, device, dtype, options
        )
        self._init_sparse(sparsity)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity}"

    def _population_forward(self, x, noise):
        return EF.sparse_linear(
            x,
            self.weight,
            self.bias,
            noise["cols"],
            noise["values"],
            noise.get("bias"),
            antithetic=self.antithetic,
        )


class PermutedLinear(PermutedNoise, _PerturbedLinearBase):
    """Linear layer with one shared noise matrix, permuted per member (NESgpu's ``PermutedLinear``).

    Forward: gather the inputs by ``π_k`` (per member offsets), one shared GEMM accumulated into the base output,
    and (output side) an index gather by ``ρ_k⁻¹``. Sparsity keeps ``in_sparsity`` inputs / ``out_sparsity`` outputs.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        directions: Population size ``N``.
        bias: If true, the layer has a (perturbed) bias.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        permutation: ``"in"``, ``"out"``, ``"both"`` or ``"auto"`` (NESgpu's rule: both if 1 < in, out < 32,
            else the larger side).
        in_sparsity: Inputs kept per member: ``0`` = all, a float = that fraction, an int = that many (forces
            input permutation).
        out_sparsity: Outputs kept per member, as ``in_sparsity`` (forces output permutation).
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        directions: int,
        bias: bool = True,
        antithetic: bool = True,
        options: dict | None = None,
        permutation: str = "auto",
        in_sparsity: int | float = 0,
        out_sparsity: int | float = 0,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_features, out_features, directions, bias, antithetic, noise_scale, seed, device, dtype, options
        )
        self._init_permuted(permutation, in_sparsity, out_sparsity)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, permutation={self.permutation!r}, in_sparsity={self.in_sparsity}, "
            f"out_sparsity={self.out_sparsity}"
        )

    def _population_forward(self, x, noise):
        return EF.permuted_linear(
            x, self.weight, self.bias, noise["shared_weight"], noise.get("in_idx"), noise.get("out_idx"),
            noise.get("bias"), antithetic=self.antithetic, out_inv=noise.get("out_inv"),
        )  # fmt: skip


class FlipoutLinear(FlipoutNoise, _PerturbedLinearBase):
    """Linear layer with one shared noise matrix and per-member sign flips (Flipout; NESgpu's ``SyntheticLinear``).

    Member ``k`` uses ``E_k = diag(r_k) E diag(s_k)``: the forward is ``((x ∘ s_k) Eᵀ) ∘ r_k``, one extra GEMM;
    the update is ``E ∘ Σ_k w_k r_k s_kᵀ`` and costs ``O(N·(in + out) + in·out)`` per side.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        directions: Population size ``N``.
        bias: If true, the layer has a (perturbed) bias.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        flip: ``"in"``, ``"out"``, ``"both"`` (Flipout) or ``"auto"`` (NESgpu's rule: both if 1 < in, out < 32,
            else the larger side).
        in_sparsity: Must be 0 (NESgpu's signature; sparse sign flips are refused there too).
        out_sparsity: Must be 0.
        noise_scale: ``σ``.
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        directions: int,
        bias: bool = True,
        antithetic: bool = True,
        options: dict | None = None,
        flip: str = "auto",
        in_sparsity: int | float = 0,
        out_sparsity: int | float = 0,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_features, out_features, directions, bias, antithetic, noise_scale, seed, device, dtype, options
        )
        self._init_flipout(flip, in_sparsity, out_sparsity)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, flip={self.flip!r}"

    def _population_forward(self, x, noise):
        return EF.flipout_linear(
            x, self.weight, self.bias, noise["shared_weight"], noise.get("in_sign"), noise.get("out_sign"),
            noise.get("bias"), antithetic=self.antithetic,
        )  # fmt: skip


#: NESgpu's name for the sign-flip layer.
SyntheticLinear = FlipoutLinear


class LowRankLinear(LowRankNoise, _PerturbedLinearBase):
    """Linear layer with rank-``r`` perturbations ``E_k = σ/√r · A_k B_kᵀ`` (EGGROLL).

    Forward: ``x Wᵀ + ((x_k B_k) A_kᵀ)``; the extra work is ``O(r·(in + out))`` per example, so the cost stays close
    to the unperturbed layer. Only ``N·r·(in + out)`` numbers are stored; the update regenerates them.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        directions: Population size ``N``.
        bias: If true, the layer has a (perturbed) bias.
        rank: Rank ``r`` of each perturbation.
        antithetic: Negate the noise in the second half of an even number of repeats.
        options: NESgpu's implementation hints (``direct``, ``combined``, ``allow_repeats``); accepted, no effect.
        noise_scale: ``σ`` (each entry of ``E_k`` has variance ``σ²``).
        seed: Base seed (``None``: a fresh one from the operating system).
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        directions: int,
        bias: bool = True,
        rank: int = 1,
        antithetic: bool = True,
        options: dict | None = None,
        noise_scale: float = 0.01,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._setup(
            in_features, out_features, directions, bias, antithetic, noise_scale, seed, device, dtype, options
        )
        self._init_lowrank(rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"

    def _population_forward(self, x, noise):
        return EF.lowrank_linear(
            x, self.weight, self.bias, noise["A"], noise["B"], noise.get("bias"), antithetic=self.antithetic
        )
