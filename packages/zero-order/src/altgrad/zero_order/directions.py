"""How the direction of one parameter leaf is represented, applied and accumulated.

* `Dense` (the default, TorchOpt's): a full tensor ``z`` of the leaf's shape per member.
* `Flipout` (es-layers' Flipout mode, for 2-D leaves): shared ``S`` with per-member sign flips.
* `LowRank` (EGGROLL-style, for 2-D leaves): ``E = A Bᵀ / √r`` with ``A`` of shape ``(out, r)`` and ``B`` of
  shape ``(in, r)`` drawn from the distribution. ``E`` has zero mean, unit variance per element and identity
  covariance, like a Gaussian direction, but costs ``r·(out + in)`` random numbers instead of ``out·in``.
  With ``factored=True`` the perturbation is never materialised: the member receives ``(±σA/√r, B)`` and the
  layer computes ``x Wᵀ + ((x B) (±σA/√r)ᵀ)`` (used for ``nn.Linear`` weights by
  `ZeroOrderGradientModule`), so the population forward costs about one plain
  forward over all rows.

Each direction type provides ``draw`` (noise of a chunk), ``inputs`` (the stacked tensors handed to the population
function) and ``accumulate`` (``grad += Σ_k w_k E_k``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

import altgrad.es_layers.functional as EF

from ._noise import NoiseSource, compute_dtype

__all__ = ["DIRECTIONS", "Dense", "DenseNoise", "Direction", "Flipout", "LowRank", "Workspace"]

#: Accepted values of ``directions=``.
DIRECTIONS: tuple[str, ...] = ("dense", "lowrank", "flipout")


class Workspace:
    """Buffers for the stacked perturbed leaves, kept between chunks and estimates.

    A fresh ``(rows, *leaf.shape)`` buffer per chunk costs more than the additions that fill it (large allocations
    are new pages from the OS every time: on a 2-core CPU 117 ms against 27 ms for the MLP's 2 x 100 members). The
    buffers hold at most one chunk (``rows * parameters`` ≤ the chunk bound); the module API keeps one workspace per
    module, the decorator one per decorated function.

    `scratch` keeps the outputs of the module API's ``nn.Linear`` population forwards the same way (each at most
    `SCRATCH_ELEMENTS` elements; larger ones are allocated per call).
    """

    #: Largest scratch tensor kept between calls (2**24 elements: 64 MiB in float32).
    SCRATCH_ELEMENTS = 1 << 24

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        self.scratch_buffers: dict[Any, Tensor] = {}

    def scratch(self, key: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape``, the same storage on every call with ``key`` when small enough.

        The caller guarantees that what it wrote there under ``key`` the last time is no longer read.
        """
        numel = math.prod(shape)
        if numel > self.SCRATCH_ELEMENTS:
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self.scratch_buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self.scratch_buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def get(
        self, leaf: int, rows: int, shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """A ``(rows, *shape)`` tensor (uninitialised) for leaf ``leaf``, reused when one large enough exists."""
        key = (leaf, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.shape[1:] != shape or buf.shape[0] < rows:
            buf = self.buffers[key] = torch.empty((rows, *shape), dtype=dtype, device=device)
        return buf[:rows]


class Direction(Protocol):
    """What the estimator needs from a direction type (the noise object is opaque to it)."""

    def draw(self, source: NoiseSource, p: Tensor, members: range, step: int) -> Any:
        """Draw the noise of ``members`` for leaf ``p``."""
        ...

    def inputs(
        self, p: Tensor, noise: Any, sigma: float, antithetic: bool, workspace: Workspace | None = None
    ) -> list[Tensor]:
        """Stacked tensors handed to the population function."""
        ...

    def accumulate(self, grad: Tensor, noise: Any, weights: Tensor) -> None:
        """``grad += Σ_k w_k E_k``."""
        ...


class DenseNoise:
    """The noise of one dense leaf for a chunk.

    Args:
        z: The directions, shape ``(n, *leaf.shape)``; after an in-place perturbation, ``p + σ z`` instead.
        fresh: Whether ``z`` is new and private, so it may be overwritten with the perturbed leaf.
    """

    def __init__(self, z: Tensor, fresh: bool) -> None:
        self.z, self.fresh = z, fresh
        self.shift: tuple[Tensor, float] | None = None  # (p, σ) when z holds p + σ z

    def directions(self) -> Tensor:
        """The directions ``z`` (recovered as ``(z - p) / σ`` after an in-place perturbation)."""
        if self.shift is None:
            return self.z
        p, sigma = self.shift
        return (self.z - p) / sigma


class Dense:
    """Full-rank directions of the leaf's shape.

    Args:
        leaf: Index of the leaf (distinct leaves draw independent noise).
        deferred: Hand the population function the member rows ``arange(rows)`` instead of the perturbed leaf
            and keep ``(p, z, σ)`` in `pending`: the layer that owns the leaf (an ``nn.Linear`` weight or bias in
            `ZeroOrderGradientModule`) applies ``p ± σ z_k`` itself, with es-layers' population forward.
    """

    def __init__(self, leaf: int, deferred: bool = False) -> None:
        self.leaf, self.deferred = leaf, deferred
        self.pending: tuple[Tensor, Tensor, float] | None = None  # (p, z, σ) of the chunk being evaluated
        self.workspace: Workspace | None = None  # where the owning layer keeps its outputs (deferred only)
        self.calls = 0  # calls of the owning layer in the chunk's evaluation so far (deferred only)

    def draw(self, source: NoiseSource, p: Tensor, members: range, step: int) -> DenseNoise:
        """Noise of ``members``: directions of shape ``(n, *p.shape)``."""
        return DenseNoise(*source.draw_fresh(self.leaf, p.shape, p.device, p.dtype, members, step))

    def inputs(
        self, p: Tensor, noise: DenseNoise, sigma: float, antithetic: bool, workspace: Workspace | None = None
    ) -> list[Tensor]:
        """Stacked perturbed leaf ``p + σ z_k`` (then ``p - σ z_k``), in ``p``'s dtype.

        A one-sided chunk whose noise is fresh is perturbed in place (no second ``(n, *p.shape)`` buffer); the
        accumulation then uses ``Σ w_k z_k = (Σ w_k (p + σ z_k) - (Σ w_k) p) / σ``.
        """
        z = noise.z
        if self.deferred:
            self.pending = (p.detach(), z, sigma)
            self.workspace, self.calls = workspace, 0
            return [torch.arange((2 if antithetic else 1) * z.shape[0], device=p.device)]
        if not antithetic and noise.fresh and z.dtype == p.dtype and z.is_contiguous():
            base = p.detach()
            torch.add(base, z, alpha=sigma, out=z)
            noise.shift = (base, sigma)
            return [z]
        return [_perturbed(p, z, sigma, antithetic, workspace, self.leaf)]

    def accumulate(self, grad: Tensor, noise: DenseNoise, weights: Tensor) -> None:
        """``grad += Σ_k w_k z_k``."""
        z = noise.z
        w = weights.to(z.dtype)
        total = w @ z.reshape(z.shape[0], -1)
        if noise.shift is not None:
            p, sigma = noise.shift
            total = (total - w.sum() * p.reshape(-1)) / sigma
        grad.add_(total.view(grad.shape))


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

    def inputs(
        self,
        p: Tensor,
        noise: tuple[Tensor, ...],
        sigma: float,
        antithetic: bool,
        workspace: Workspace | None = None,
    ) -> list[Tensor]:
        """``[p ± σ A Bᵀ/√r]`` or, factored, ``[±σ A/√r, B]`` (cast to ``p``'s dtype)."""
        a, b = noise
        scale = sigma / math.sqrt(self.rank)
        if self.factored:
            return _factored(a * scale, b, antithetic, p.dtype)
        e = torch.bmm(a, b.transpose(1, 2))
        return [_perturbed(p, e, scale, antithetic, workspace, self.leaf)]

    def accumulate(self, grad: Tensor, noise: tuple[Tensor, ...], weights: Tensor) -> None:
        """``grad += Σ_k w_k A_k B_kᵀ / √r`` (es-layers' low-rank update, one GEMM)."""
        a, b = noise
        w = weights.to(a.dtype)
        grad.add_(EF.lowrank_weighted_sum(w, a, b, grad.shape, sigma=1.0 / math.sqrt(self.rank)))


class Flipout:
    """Flipout directions for a 2-D leaf ``(out, in)``: ``E_k = diag(r_k) S diag(s_k)`` (es-layers' Flipout mode).

    ``S`` (``out × in``) is shared by the members: a seeded distribution regenerates it once per estimate (member 0's
    draw, the same in every chunk and on every rank); another distribution is asked for it once per chunk. The signs
    ``r_k`` (``out``) and ``s_k`` (``in``) are the signs of per-member draws (Rademacher for any symmetric
    distribution). Each ``E_k`` has zero mean; given ``S``, its covariance is ``diag(S∘S)``, so for Gaussian ``S``
    the estimate is ``S∘S ∘ ∇f`` in expectation over the signs and unbiased over ``S`` (with
    `SeededRademacher`, ``S∘S = 1``: unbiased for every ``S``). Random numbers: ``out·in`` per chunk plus
    ``out + in`` per member. With ``factored=True`` (``nn.Linear`` weights in `ZeroOrderGradientModule`) the
    perturbation is never materialised: the layer runs ``es_layers.functional.flipout_linear``, one shared GEMM
    with ``S`` for all members.

    Args:
        leaf: Index of the leaf.
        num_leaves: Total number of leaves (signs use leaf ids ``leaf + num_leaves`` and ``leaf + 2 num_leaves``).
        factored: Hand ``(out signs, in signs)`` to the population function and keep ``σS`` for the layer.
    """

    def __init__(self, leaf: int, num_leaves: int, factored: bool = False) -> None:
        self.leaf, self.num_leaves, self.factored = leaf, num_leaves, factored
        self.shared: Tensor | None = None  # σS of the chunk being evaluated (factored layers read it)

    def draw(self, source: NoiseSource, p: Tensor, members: range, step: int) -> tuple[Tensor, ...]:
        """``(S, out_signs (n, out), in_signs (n, in))``."""
        out_f, in_f = p.shape
        shared = source.draw(self.leaf, (out_f, in_f), p.device, p.dtype, range(1), step)[0]
        out_s = _signs(source.draw(self.leaf + self.num_leaves, (out_f,), p.device, p.dtype, members, step))
        in_s = _signs(source.draw(self.leaf + 2 * self.num_leaves, (in_f,), p.device, p.dtype, members, step))
        return shared, out_s, in_s

    def inputs(
        self,
        p: Tensor,
        noise: tuple[Tensor, ...],
        sigma: float,
        antithetic: bool,
        workspace: Workspace | None = None,
    ) -> list[Tensor]:
        """``[p ± σ E_k]`` or, factored, ``[±out_signs, in_signs]`` (``σS`` kept in `shared`)."""
        shared, out_s, in_s = noise
        if self.factored:
            self.shared = (shared * sigma).to(p.dtype)
            return _factored(out_s, in_s, antithetic, p.dtype)
        e = EF.flipout_dense(shared, in_s, out_s)
        return [_perturbed(p, e, sigma, antithetic, workspace, self.leaf)]

    def accumulate(self, grad: Tensor, noise: tuple[Tensor, ...], weights: Tensor) -> None:
        """``grad += Σ_k w_k E_k = S ∘ (Σ_k w_k r_k s_kᵀ)`` (es-layers' Flipout update, one GEMM)."""
        shared, out_s, in_s = noise
        grad.add_(EF.flipout_weighted_sum(weights.to(shared.dtype), shared, in_s, out_s))


def _signs(z: Tensor) -> Tensor:
    """±1 with the sign of ``z`` (0 maps to +1)."""
    return torch.where(z < 0, -1.0, 1.0).to(z.dtype)


def _factored(signed: Tensor, kept: Tensor, antithetic: bool, dtype: torch.dtype) -> list[Tensor]:
    """``[signed, kept]``, antithetic: ``[cat(signed, -signed), cat(kept, kept)]`` (cast to ``dtype``)."""
    if antithetic:
        signed, kept = torch.cat([signed, -signed]), torch.cat([kept, kept])
    return [signed.to(dtype), kept.to(dtype)]


def _perturbed(
    p: Tensor, z: Tensor, sigma: float, antithetic: bool, workspace: Workspace | None = None, leaf: int = 0
) -> Tensor:
    """Stack ``p + σ z_k`` (then ``p - σ z_k``) for the chunk, computed in at least float32."""
    n = z.shape[0]
    work = compute_dtype(p.dtype)
    base = p.detach().to(work)
    rows = (2 if antithetic else 1) * n
    if workspace is not None and work == p.dtype:
        out = workspace.get(leaf, rows, p.shape, work, p.device)
    else:
        out = torch.empty((rows, *p.shape), dtype=work, device=p.device)
    torch.add(base, z, alpha=sigma, out=out[:n])
    if antithetic:
        torch.add(base, z, alpha=-sigma, out=out[n:])
    return out if work == p.dtype else out.to(p.dtype)
