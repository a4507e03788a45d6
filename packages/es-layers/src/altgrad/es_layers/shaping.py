"""Fitness shaping: turn raw fitness (or loss) values into update weights.

The update of every perturbed layer is ``Σ_k w_k E_k``; these helpers compute common choices of ``w``.
They keep the sign of their input (a larger fitness gives a larger weight), so pass losses to minimise them with a
``torch.optim`` optimizer (the update is written into ``.grad``, which the optimizer descends), or negated
rewards to maximise rewards.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["antithetic_difference", "centered_ranks", "z_score"]


def _as_float_tensor(name: str, fitness: object) -> Tensor:
    if not isinstance(fitness, Tensor):
        try:
            fitness = torch.as_tensor(fitness)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor or a sequence of numbers") from None
    if fitness.dtype == torch.bool or fitness.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {fitness.dtype}")
    if not fitness.is_floating_point():
        fitness = fitness.to(torch.get_default_dtype())
    if fitness.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if fitness.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    return fitness


def _all_finite(fitness: Tensor) -> bool:
    """NaN/inf fitness is never shaped into finite weights: the callers then return all-NaN weights."""
    return bool(torch.isfinite(fitness).all())


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (fp16/bf16 cannot hold distinct ranks beyond 2048/256)."""
    return torch.promote_types(dtype, torch.float32)


def centered_ranks(fitness: Tensor) -> Tensor:
    """Centered ranks (OpenAI-ES): ranks scaled linearly to ``[-0.5, 0.5]``.

    The smallest value gets ``-0.5``, the largest ``+0.5``; ties are broken by position (stable sort), as in the
    OpenAI ES starter code and evosax. All entries are ranked together whatever the shape.

    Args:
        fitness: Real tensor (or sequence) of fitness values, any shape.

    Returns:
        Float tensor of the same shape, in float32 for fp16/bf16 input (ranks are computed in at least float32),
        else in the input's floating dtype. A single value maps to ``0``.

    Raises:
        TypeError: If ``fitness`` is not real-valued.
        ValueError: If ``fitness`` is a scalar or empty.

    A fitness holding NaN or inf stays non-finite: every returned weight is NaN (never a finite, plausible step;
    the layers' ``update``/``set_grad`` refuse non-finite weights with a clear error).

    Example:
        >>> centered_ranks(torch.tensor([3.0, -1.0, 10.0]))
        tensor([ 0.0000, -0.5000,  0.5000])
    """
    f = _as_float_tensor("fitness", fitness)
    dt = _work_dtype(f.dtype)
    if not _all_finite(f):
        return torch.full(f.shape, float("nan"), dtype=dt, device=f.device)
    flat = f.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty(n, dtype=dt, device=f.device)
    ranks[order] = torch.arange(n, dtype=dt, device=f.device)
    if n > 1:
        ranks = ranks / (n - 1) - 0.5
    else:
        ranks = ranks * 0
    return ranks.reshape(f.shape)


def z_score(fitness: Tensor, eps: float = 1e-8) -> Tensor:
    """Standardise fitness values: ``(f - mean(f)) / (std(f) + eps)`` (population std, ``correction=0``).

    Args:
        fitness: Real tensor (or sequence) of fitness values, any shape; standardised over all entries.
        eps: Non-negative constant added to the standard deviation.

    Returns:
        Float tensor of the same shape (float32 for fp16/bf16 input, which is standardised in float32).

    Raises:
        TypeError: If ``fitness`` is not real-valued.
        ValueError: If ``fitness`` is a scalar or empty, or ``eps`` is negative.

    A fitness holding NaN or inf stays non-finite: every returned value is NaN.

    Example:
        >>> z_score(torch.tensor([1.0, 2.0, 3.0]))
        tensor([-1.2247,  0.0000,  1.2247])
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    f = _as_float_tensor("fitness", fitness)
    f = f.to(_work_dtype(f.dtype))
    if not _all_finite(f):
        return torch.full_like(f, float("nan"))
    mean = f.mean()
    std = f.std(correction=0)
    return (f - mean) / (std + eps)


def antithetic_difference(fitness: Tensor) -> Tensor:
    """Difference of antithetic pairs: ``fitness[:n/2] - fitness[n/2:]`` along the first dimension.

    Layout (the one of the perturbed layers): the first half of the population used ``+E_k``, the second half the
    negated noise ``-E_k``, in the same member order. With the layers' input layout ``(repeats, directions, ...)``
    and two repeats, the flattened fitness of shape ``(2 * directions,)`` gives one weight per direction. Since
    ``f(θ+E) - f(θ-E) ≈ 2 ∇f·E``, the weights ``0.5 * antithetic_difference(f) / σ²`` give an unbiased gradient
    estimate through ``update``.

    Args:
        fitness: Real tensor (or sequence) whose first dimension has even length ``n``.

    Returns:
        Tensor of shape ``(n // 2, *fitness.shape[1:])``.

    Raises:
        TypeError: If ``fitness`` is not real-valued.
        ValueError: If the first dimension is odd or ``fitness`` is a scalar or empty.

    Example:
        >>> antithetic_difference(torch.tensor([5.0, 1.0, 2.0, 4.0]))
        tensor([ 3., -3.])
    """
    f = _as_float_tensor("fitness", fitness)
    n = f.shape[0]
    if n % 2:
        raise ValueError(
            f"fitness must have an even first dimension (first half +noise, second half -noise), got {n}"
        )
    return f[: n // 2] - f[n // 2 :]
