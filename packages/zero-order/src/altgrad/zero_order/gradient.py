"""One zero-order gradient estimate: draw directions, evaluate the population in chunks, combine.

This is the engine behind `zero_order` and
`ZeroOrderGradientModule`, also usable directly through `estimate_gradient`.

Memory is bounded by the chunk: the directions of one chunk are drawn, the chunk's ``(rows, *leaf.shape)``
perturbed parameters are built and evaluated in one batched call, the chunk's contribution is added to the
gradient and everything is freed. Methods that need all values before weighting (``es``, ``ars``) take a second
pass in which seeded distributions *regenerate* the noise (MeZO-style, nothing stored) and other distributions
replay the noise kept from the first pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._errors import MethodError
from ._noise import NoiseSource, compute_dtype
from .directions import DIRECTIONS, Dense, Direction, LowRank
from .estimators import ANTITHETIC_METHODS, METHODS, TWO_PASS_METHODS, direction_weights
from .population import BATCHING_MODES, PopulationEvaluator, check_output

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "EstimatorOptions", "SigmaResolutionWarning", "estimate_gradient"]

#: Default bound on ``rows * parameters`` held at once when ``chunk_size`` is None (2**24 floats = 64 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class EstimatorOptions:
    """Validated estimator settings.

    Args:
        method: ``"naive"``, ``"forward"``, ``"antithetic"``, ``"es"`` or ``"ars"``.
        num_samples: Number of directions N (antithetic methods evaluate 2N members).
        sigma: Perturbation scale σ > 0.
        chunk_size: Maximum number of perturbed members evaluated in one batched call; None picks it so that a
            chunk holds about `DEFAULT_CHUNK_ELEMENTS` perturbed parameters.
        batching: ``"auto"``, ``"vmap"`` or ``"loop"`` (see `population`).
        top_k: Directions kept by ``"ars"`` (default: all N).
        sample_batched: Ask a user distribution for all members of a chunk at once.
        directions: ``"dense"`` (full-rank noise of each leaf's shape, TorchOpt's) or ``"lowrank"`` (rank-``rank``
            directions ``A Bᵀ/√r`` for 2-D leaves; see `directions`).
        rank: Rank r of low-rank directions.

    Raises:
        MethodError: For an unknown ``method`` (a ``ValueError`` that is also an ``AssertionError``).
        TypeError: For arguments of the wrong type.
        ValueError: For out-of-range values.
    """

    method: str = "naive"
    num_samples: int = 1
    sigma: float = 1.0
    chunk_size: int | None = None
    batching: str = "auto"
    top_k: int | None = None
    sample_batched: bool = True
    directions: str = "dense"
    rank: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MethodError(f"`method` must be one of {METHODS}, got {self.method!r}")
        _check_positive_int("num_samples", self.num_samples)
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)):
            raise TypeError(f"`sigma` must be a float, got {type(self.sigma).__name__}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"`sigma` must be a finite number > 0, got {self.sigma}")
        if self.chunk_size is not None:
            _check_positive_int("chunk_size", self.chunk_size)
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"`batching` must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.top_k is not None:
            _check_positive_int("top_k", self.top_k)
            if self.method != "ars":
                raise ValueError(f"`top_k` only applies to method='ars', got method={self.method!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"`directions` must be one of {DIRECTIONS}, got {self.directions!r}")
        _check_positive_int("rank", self.rank)
        if not isinstance(self.sample_batched, bool):
            raise TypeError(f"`sample_batched` must be a bool, got {type(self.sample_batched).__name__}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")


def _directions_per_chunk(options: EstimatorOptions, params: Sequence[Tensor]) -> int:
    rows_per_direction = 2 if options.method in ANTITHETIC_METHODS else 1
    if options.chunk_size is not None:
        rows = options.chunk_size
    else:
        numel = max(1, sum(p.numel() for p in params))
        rows = max(1, DEFAULT_CHUNK_ELEMENTS // numel)
    return max(1, min(options.num_samples, rows // rows_per_direction))


def default_plans(options: EstimatorOptions, params: Sequence[Tensor]) -> list[Direction]:
    """Direction type per leaf: dense, or low-rank (materialised) for 2-D leaves when asked."""
    lowrank = options.directions == "lowrank"
    return [
        LowRank(i, len(params), options.rank) if lowrank and p.ndim == 2 else Dense(i)
        for i, p in enumerate(params)
    ]


@torch.no_grad()
def run_estimate(
    evaluate: PopulationEvaluator,
    params: Sequence[Tensor],
    source: NoiseSource,
    options: EstimatorOptions,
    grad_output: Tensor | float = 1.0,
    f0: Tensor | None = None,
    plans: Sequence[Direction] | None = None,
) -> list[Tensor]:
    """Core loop shared by every entry point (the arguments are already validated).

    Args:
        evaluate: Evaluates stacked perturbed leaves.
        params: The leaves to perturb.
        source: Where directions come from.
        options: Estimator settings.
        grad_output: Incoming gradient (chain rule), a scalar.
        f0: Unperturbed value, needed by ``forward``.
        plans: Direction type per leaf (default: `default_plans`).

    Returns:
        One gradient per leaf, in the leaf's dtype and on its device.
    """
    if plans is None:
        plans = default_plans(options, params)
    method, n_dir, sigma = options.method, options.num_samples, options.sigma
    antithetic = method in ANTITHETIC_METHODS
    step = source.new_step()
    per_chunk = _directions_per_chunk(options, params)
    chunks = [range(s, min(n_dir, s + per_chunk)) for s in range(0, n_dir, per_chunk)]
    value_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = params[0].device
    g = torch.as_tensor(grad_output, dtype=value_dtype).to(device)
    if f0 is not None:
        f0 = f0.detach().to(device=device, dtype=value_dtype)
    grads = [torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device) for p in params]
    two_pass = method in TWO_PASS_METHODS
    check_sigma_resolution(params, plans, sigma)
    finite = torch.ones((), dtype=torch.bool, device=device)
    kept_noise: list[list[Any]] = []
    values_plus: list[Tensor] = []
    values_minus: list[Tensor] = []

    for members in chunks:
        noise = [plan.draw(source, p, members, step) for plan, p in zip(plans, params)]
        values = evaluate(
            [x for plan, p, z in zip(plans, params, noise) for x in plan.inputs(p, z, sigma, antithetic)]
        )
        values = values.detach().to(device=device, dtype=value_dtype)
        finite &= torch.isfinite(values).all()
        f_plus, f_minus = (values[: len(members)], values[len(members) :]) if antithetic else (values, None)
        if two_pass:
            assert f_minus is not None  # two-pass methods are antithetic
            values_plus.append(f_plus)
            values_minus.append(f_minus)
            if not source.regenerable:
                kept_noise.append(noise)
            continue
        weights = direction_weights(method, f_plus, f_minus=f_minus, f0=f0, sigma=sigma, num_directions=n_dir)
        for plan, grad, z in zip(plans, grads, noise):
            plan.accumulate(grad, z, weights * g)
        del noise

    if two_pass:
        weights = direction_weights(
            method,
            torch.cat(values_plus),
            f_minus=torch.cat(values_minus),  # type: ignore[arg-type]
            sigma=sigma,
            num_directions=n_dir,
            top_k=options.top_k,
        )
        weights = weights * g
        for c, members in enumerate(chunks):
            w = weights[members.start : members.stop]
            for i, (plan, grad, p) in enumerate(zip(plans, grads, params)):
                chunk_noise = kept_noise[c][i] if kept_noise else plan.draw(source, p, members, step)
                plan.accumulate(grad, chunk_noise, w)
    # Non-finite values never become a finite step: ranks (es), top-b selection (ars) or a zero direction
    # element could otherwise hide them. Every element of every gradient is then NaN (see the docs).
    if f0 is not None:
        finite &= torch.isfinite(f0)
    finite &= torch.isfinite(torch.as_tensor(g))
    for grad in grads:
        grad.masked_fill_(~finite.to(grad.device), float("nan"))
    return [grad if grad.dtype == p.dtype else grad.to(p.dtype) for grad, p in zip(grads, params)]


class SigmaResolutionWarning(UserWarning):
    """σ is at or below the spacing of the parameter's dtype at the parameter's scale (perturbations are lost)."""


def check_sigma_resolution(params: Sequence[Tensor], plans: Sequence[Direction], sigma: float) -> None:
    """Warn when ``θ ± σz`` cannot be represented in a leaf's dtype (issue: bf16, σ = 1e-4, |θ| = 1).

    A perturbation applied in the parameter's dtype is rounded to multiples of ``eps·|θ|``; when σ is at most
    ``eps(dtype)·max|θ|`` a unit direction moves the largest elements by one ulp or less, and the estimate comes out
    zero or shrunken. Leaves whose perturbation is applied to activations (factored low-rank) are skipped.

    Raises:
        SigmaResolutionWarning: (as a warning) naming sigma, the dtype, the leaf and its scale.
    """
    checked = [(i, p) for i, (p, plan) in enumerate(zip(params, plans)) if not getattr(plan, "factored", False)]
    if not checked:
        return
    # the scale is the largest finite |θ| (non-finite parameters give a NaN estimate anyway)
    maxima = [
        torch.nan_to_num(p.detach().abs(), nan=0.0, posinf=0.0).amax().to(torch.float64).cpu()
        for _, p in checked
        if p.numel()
    ]
    scales = iter(torch.stack(maxima).tolist() if maxima else [])
    checked = [(i, p) for i, p in checked if p.numel()]
    for (i, p), scale in zip(checked, scales):
        resolution = torch.finfo(p.dtype).eps * scale
        if sigma <= resolution:
            warnings.warn(
                f"sigma={sigma:g} is at or below the resolution of {p.dtype} at the scale of parameter leaf {i} "
                f"(shape {tuple(p.shape)}, max |θ| = {scale:.4g}, eps·max|θ| = {resolution:.3g}): θ ± σz rounds "
                "to within one ulp of θ, so the gradient estimate is zero or shrunken. Use a larger sigma or a "
                "wider parameter dtype.",
                SigmaResolutionWarning,
                stacklevel=4,
            )


def estimate_gradient(
    fn: Callable[..., Tensor],
    params: Sequence[Tensor],
    distribution: Any,
    method: str = "naive",
    num_samples: int = 1,
    sigma: float = 1.0,
    *,
    chunk_size: int | None = None,
    batching: str = "auto",
    top_k: int | None = None,
    sample_batched: bool = True,
    directions: str = "dense",
    rank: int = 1,
    grad_output: Tensor | float = 1.0,
) -> tuple[Tensor, ...]:
    r"""Estimate $\nabla f$ at ``params`` from function values only.

    This is the functional core of `zero_order` without autograd: it returns the
    estimate directly. ``fn`` is called as ``fn(*params)`` with perturbed tensors (batched under
    ``torch.func.vmap`` when possible) and must return a scalar tensor.

    Args:
        fn: Function of the parameter tensors returning a scalar tensor.
        params: The parameter tensors (a sequence).
        distribution: A Samplable, a callable ``fn(sample_shape)`` or a seeded distribution of
            `distributions`.
        method: ``"naive"``, ``"forward"``, ``"antithetic"``, ``"es"`` or ``"ars"``.
        num_samples: Number of directions N.
        sigma: Perturbation scale σ.
        chunk_size: Maximum number of members per batched evaluation (None: automatic).
        batching: ``"auto"``, ``"vmap"`` or ``"loop"``.
        top_k: Directions kept by ``"ars"``.
        sample_batched: Draw all members of a chunk in one call of a user distribution.
        directions: ``"dense"`` or ``"lowrank"`` (rank-``rank`` directions for 2-D parameters).
        rank: Rank of low-rank directions.
        grad_output: Multiplier of the estimate (the incoming gradient in the chain rule).

    Returns:
        One gradient estimate per parameter tensor.

    Raises:
        TypeError: If ``distribution`` is neither Samplable nor callable, or ``params`` holds a non-tensor.
        ValueError: For invalid settings or an empty ``params``.

    Example:
        >>> import torch
        >>> from altgrad.zero_order import estimate_gradient, SeededNormal
        >>> a = torch.tensor([1.0, -2.0])
        >>> (g,) = estimate_gradient(lambda t: a @ t, [torch.zeros(2)], SeededNormal(0), "antithetic", 4000)
        >>> torch.allclose(g, a, atol=0.1)
        True
    """
    options = EstimatorOptions(
        method, num_samples, sigma, chunk_size, batching, top_k, sample_batched, directions, rank
    )
    source = NoiseSource(distribution, sample_batched=sample_batched)
    params = list(params)
    if not params:
        raise ValueError("`params` must hold at least one tensor")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"`params[{i}]` must be a tensor, got {type(p).__name__}")
    f0 = None
    if method == "forward":
        with torch.no_grad():
            f0 = check_output(fn(*params))
    evaluate = PopulationEvaluator(fn, batching)
    return tuple(run_estimate(evaluate, params, source, options, grad_output, f0))
