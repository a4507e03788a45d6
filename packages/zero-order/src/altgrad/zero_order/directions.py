"""How the direction of one parameter leaf is represented, applied and accumulated.

* :class:`Dense` (the default, TorchOpt's): a full tensor ``z`` of the leaf's shape per member.
* :class:`LowRank` (EGGROLL-style, for 2-D leaves): ``E = A Bᵀ / √r`` with ``A`` of shape ``(out, r)`` and ``B`` of
  shape ``(in, r)`` drawn from the distribution. ``E`` has zero mean, unit variance per element and identity
  covariance, like a Gaussian direction, but costs ``r·(out + in)`` random numbers instead of ``out·in``.
  With ``factored=True`` the perturbation is never materialised: the member receives ``(±σA/√r, B)`` and the
  layer computes ``x Wᵀ + ((x B) (±σA/√r)ᵀ)`` (used for ``nn.Linear`` weights by
  :class:`~altgrad.zero_order.ZeroOrderGradientModule`), so the population forward costs about one plain
  forward over all rows.

Each direction type provides ``draw`` (noise of a chunk), ``inputs`` (the stacked tensors handed to the population
function) and ``accumulate`` (``grad += Σ_k w_k E_k``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._noise import NoiseSource, compute_dtype

__all__ = ["DIRECTIONS", "Dense", "LowRank"]

#: Accepted values of ``directions=``.
DIRECTIONS: tuple[str, ...] = ("dense", "lowrank")


class Dense:
    """Full-rank directions of the leaf's shape.

    Args:
        leaf: Index of the leaf (distinct leaves draw independent noise).
    """

    def __init__(self, leaf: int) -> None:
        self.leaf = leaf

    def draw(self, source: NoiseSource, p: Tensor, members: range, step: int) -> tuple[Tensor, ...]:
        """Noise of ``members``: ``(z,)`` with ``z`` of shape ``(n, *p.shape)``."""
        return (source.draw(self.leaf, p.shape, p.device, p.dtype, members, step),)

    def inputs(self, p: Tensor, noise: tuple[Tensor, ...], sigma: float, antithetic: bool) -> list[Tensor]:
        """Stacked perturbed leaf ``p + σ z_k`` (then ``p - σ z_k``), in ``p``'s dtype."""
        (z,) = noise
        return [_perturbed(p, z, sigma, antithetic)]

    def accumulate(self, grad: Tensor, noise: tuple[Tensor, ...], weights: Tensor) -> None:
        """``grad += Σ_k w_k z_k``."""
        (z,) = noise
        grad.add_((weights.to(z.dtype) @ z.reshape(z.shape[0], -1)).view(grad.shape))


class LowRank:
    """Rank-``r`` directions ``A Bᵀ / √r`` for a 2-D leaf of shape ``(out, in)``.

    Args:
        leaf: Index of the leaf.
        num_leaves: Total number of leaves (the ``B`` factor uses leaf id ``leaf + num_leaves``).
        rank: The rank r.
        factored: Hand the factors to the population function instead of the perturbed leaf.
    """

    def __init__(self, leaf: int, num_leaves: int, rank: int, factored: bool = False) -> None:
        self.leaf, self.num_leaves, self.rank, self.factored = leaf, num_leaves, rank, factored

    def draw(self, source: NoiseSource, p: Tensor, members: range, step: int) -> tuple[Tensor, ...]:
        """Factors ``(A, B)`` of shapes ``(n, out, r)`` and ``(n, in, r)``."""
        out_f, in_f = p.shape
        a = source.draw(self.leaf, (out_f, self.rank), p.device, p.dtype, members, step)
        b = source.draw(self.leaf + self.num_leaves, (in_f, self.rank), p.device, p.dtype, members, step)
        return a, b

    def inputs(self, p: Tensor, noise: tuple[Tensor, ...], sigma: float, antithetic: bool) -> list[Tensor]:
        """``[p ± σ A Bᵀ/√r]`` or, factored, ``[±σ A/√r, B]`` (cast to ``p``'s dtype)."""
        a, b = noise
        scale = sigma / math.sqrt(self.rank)
        if self.factored:
            a_scaled = torch.cat([a, -a]) * scale if antithetic else a * scale
            b_rep = torch.cat([b, b]) if antithetic else b
            return [a_scaled.to(p.dtype), b_rep.to(p.dtype)]
        e = torch.bmm(a, b.transpose(1, 2))
        return [_perturbed(p, e, scale, antithetic)]

    def accumulate(self, grad: Tensor, noise: tuple[Tensor, ...], weights: Tensor) -> None:
        """``grad += Σ_k w_k A_k B_kᵀ / √r``."""
        a, b = noise
        n, out_f, r = a.shape
        aw = (a * (weights.to(a.dtype) / math.sqrt(self.rank)).view(n, 1, 1)).permute(1, 0, 2)
        grad.add_(aw.reshape(out_f, n * r) @ b.transpose(1, 2).reshape(n * r, -1))


def _perturbed(p: Tensor, z: Tensor, sigma: float, antithetic: bool) -> Tensor:
    """Stack ``p + σ z_k`` (then ``p - σ z_k``) for the chunk, computed in at least float32."""
    n = z.shape[0]
    work = compute_dtype(p.dtype)
    base = p.detach().to(work)
    out = torch.empty(((2 if antithetic else 1) * n, *p.shape), dtype=work, device=p.device)
    torch.add(base, z, alpha=sigma, out=out[:n])
    if antithetic:
        torch.add(base, z, alpha=-sigma, out=out[n:])
    return out if work == p.dtype else out.to(p.dtype)
