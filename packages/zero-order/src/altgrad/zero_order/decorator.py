"""``zero_order``: TorchOpt's zero-order differentiation decorator, batched.

The decorated function returns the *unperturbed* value ``f(θ)`` with a backward node. Its backward pass estimates
the gradient for the tensor leaves of the positional arguments ``args[argnums]`` (nested tuples, lists, dicts and
namedtuples are fine) from function values only, and multiplies it by the incoming gradient. Other arguments,
positional or keyword, are passed through unchanged and receive no gradient.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._errors import ArgnumsError
from ._noise import NoiseSource, check_distribution
from .directions import Workspace
from .estimators import Method
from .gradient import EstimatorOptions, check_distributed_source, run_estimate
from .inference import run_functional
from .population import Batching, PopulationEvaluator, check_output

__all__ = ["zero_order"]


class ZeroOrder(torch.autograd.Function):
    """Autograd node: forward evaluates f(θ); backward runs the zero-order estimate."""

    @staticmethod
    def forward(ctx: Any, call: _Call, *flat_params: Tensor) -> Tensor:
        output = check_output(call.center())
        if any(output is p for p in flat_params):
            output = output.clone()
        ctx.call = call
        if call.options.method == "forward":
            ctx.save_for_backward(*flat_params, output)
        else:
            ctx.save_for_backward(*flat_params)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        n = len(saved) - (1 if call.options.method == "forward" else 0)
        flat_params, f0 = saved[:n], (saved[n] if n < len(saved) else None)
        wanted = [i for i in range(n) if ctx.needs_input_grad[i + 1]]
        grads: list[Tensor | None] = [None] * n
        if wanted:
            estimates = call.estimate([flat_params[i] for i in wanted], wanted, grad_output, f0)
            for i, grad in zip(wanted, estimates):
                grads[i] = grad
        return (None, *grads)


class _Call:
    """One call of a decorated function: its arguments, and how to evaluate it at perturbed parameters."""

    def __init__(
        self,
        fn: Callable[..., Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        argnums: tuple[int, ...],
        flat_all: list[Any],
        positions: list[int],
        spec: pytree.TreeSpec,
        source: NoiseSource,
        options: EstimatorOptions,
        evaluator_cache: dict[str, Any],
    ) -> None:
        self.fn, self.args, self.kwargs, self.argnums = fn, args, kwargs, argnums
        self.flat_all, self.positions, self.spec = flat_all, positions, spec
        self.flat_params: list[Tensor] = [flat_all[i] for i in positions]
        self.source, self.options, self.evaluator_cache = source, options, evaluator_cache

    def center(self) -> Any:
        return self.fn(*self.args, **self.kwargs)

    def _call_with(self, flat_params: list[Tensor]) -> Tensor:
        flat_all = list(self.flat_all)
        for i, value in zip(self.positions, flat_params):
            flat_all[i] = value
        args = list(self.args)
        for argnum, value in zip(self.argnums, pytree.tree_unflatten(flat_all, self.spec)):
            args[argnum] = value
        return self.fn(*args, **self.kwargs)

    def estimate(
        self, params: list[Tensor], indices: list[int], grad_output: Tensor, f0: Tensor | None
    ) -> list[Tensor]:
        base = [p.detach() for p in self.flat_params]

        def fn_of_leaves(*leaves: Tensor) -> Tensor:
            flat = list(base)
            for i, leaf in zip(indices, leaves):
                flat[i] = leaf
            return self._call_with(flat)

        if self.options.memory == "inference":
            with self.source.step_on_success():
                return run_functional(fn_of_leaves, params, self.source, self.options, grad_output, f0)
        # The vmap/loop decision is remembered per decorated function (shared cache), not per call.
        evaluator = PopulationEvaluator(fn_of_leaves, self.options.batching)
        evaluator.resolved = self.evaluator_cache.get("resolved", evaluator.resolved)
        # The function's workspace is reused by one estimate at a time; a concurrent one (another thread) gets
        # its own, so two threads never write the same buffers.
        lock = self.evaluator_cache["lock"]
        shared = lock.acquire(blocking=False)
        try:
            workspace = self.evaluator_cache.setdefault("workspace", Workspace()) if shared else Workspace()
            grads = run_estimate(
                evaluator, params, self.source, self.options, grad_output, f0, workspace=workspace
            )
        finally:
            if shared:
                lock.release()
        if self.options.batching == "auto" and evaluator.resolved is not None:
            self.evaluator_cache["resolved"] = evaluator.resolved
        return grads


def _normalise_argnums(argnums: Any) -> tuple[int, ...]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return (argnums,)
    if isinstance(argnums, (tuple, list)) and all(
        isinstance(a, int) and not isinstance(a, bool) for a in argnums
    ):
        if not argnums:
            raise ValueError("`argnums` must name at least one positional argument")
        return tuple(argnums)
    raise TypeError(f"`argnums` must be an int or a tuple of ints, got {argnums!r}")


def _resolve_argnums(argnums: tuple[int, ...], nargs: int) -> tuple[int, ...]:
    resolved = []
    for a in argnums:
        if not -nargs <= a < nargs:
            raise ArgnumsError(
                f"`argnums` {argnums} refers to argument {a}, but the function was called with {nargs} "
                "positional argument(s)"
            )
        resolved.append(a % nargs)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`argnums` {argnums} names the same argument twice")
    return tuple(resolved)


def zero_order(
    distribution: Any,
    method: Method = "naive",
    argnums: int | tuple[int, ...] = (0,),
    num_samples: int = 1,
    sigma: float = 1.0,
    *,
    chunk_size: int | None = None,
    batching: Batching = "auto",
    top_k: int | None = None,
    sample_batched: bool = True,
    directions: str = "dense",
    rank: int = 1,
    process_group: Any = None,
    memory: str = "batched",
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    r"""Return a decorator that gives a scalar function zero-order (ES / finite-difference) gradients.

    Drop-in for ``torchopt.diff.zero_order.zero_order`` (same parameters, order, defaults and errors). The
    decorated function returns ``f(θ)`` unperturbed; ``torch.autograd.grad`` / ``.backward()`` then estimates
    $\nabla_\theta \mathbb{E}_z[f(\theta + \sigma z)]$ for the tensor leaves of ``args[argnums]``:

    - ``naive``: $\frac{1}{N}\sum_k f(\theta+\sigma z_k)\, z_k / \sigma$ (N evaluations);
    - ``forward``: $\frac{1}{N}\sum_k (f(\theta+\sigma z_k) - f(\theta))\, z_k / \sigma$ (N evaluations;
      TorchOpt ≤ 0.7.3 multiplies by σ instead and overwrites its baseline, see the docs);
    - ``antithetic``: $\frac{1}{N}\sum_k (f(\theta+\sigma z_k) - f(\theta-\sigma z_k))\, z_k / (2\sigma)$
      (2N evaluations);
    - ``es`` (OpenAI-ES, centered ranks) and ``ars`` (top-``top_k`` directions, std-normalised): see
      `estimators`.

    Unlike TorchOpt, all members are evaluated in batched calls (``torch.func.vmap``, chunked by ``chunk_size``),
    noise is drawn on each parameter's device in at least float32, the decorated function accepts keyword
    arguments, and leaves that do not require grad are not perturbed.

    Args:
        distribution: Noise distribution with zero mean and unit variance per element: an object with
            ``sample(sample_shape)`` (e.g. ``torch.distributions.Normal(0, 1)``), a callable ``fn(sample_shape)``,
            or a seeded distribution (`SeededNormal`,
            `SeededRademacher`, `NoiseTable`).
        method: ``"naive"``, ``"forward"``, ``"antithetic"``, ``"es"`` or ``"ars"``.
        argnums: Index or indices of the positional arguments to differentiate (pytrees of tensors).
        num_samples: Number of directions N (antithetic methods evaluate 2N members).
        sigma: Perturbation scale σ.
        chunk_size: Maximum number of perturbed members per batched evaluation; None bounds a chunk to about
            2**24 perturbed parameter values.
        batching: ``"auto"`` (vmap, falling back to a loop if the function cannot be vmapped), ``"vmap"`` or
            ``"loop"``.
        top_k: Number of directions kept by ``method="ars"`` (default: all).
        sample_batched: Draw all members of a chunk with one ``sample((n, *shape))`` call (the Samplable contract:
            i.i.d. over leading dimensions). Set False for a sampler that only handles one parameter shape.
        directions: ``"dense"`` (default; noise of each leaf's shape, as TorchOpt) or ``"lowrank"``: 2-D leaves
            get rank-``rank`` directions ``A Bᵀ/√r`` (``r·(out+in)`` random numbers instead of ``out·in``; same
            mean and covariance as a standard normal direction).
        rank: Rank r of low-rank directions.
        process_group: A ``torch.distributed`` process group to shard the population over: each rank evaluates
            a contiguous block of the members, only the per-member values are all-gathered, and every rank
            regenerates all directions from the seed and gets the same full gradient. Needs a seeded
            ``distribution`` and the same function and inputs on every rank. None (default): one process.
        memory: ``"batched"`` (default) or ``"inference"``: the members are evaluated one after another with one
            perturbed copy of the differentiated leaves, directions are regenerated from their seed (never stored)
            and the arguments are never written (``chunk_size`` and ``batching`` are unused); see `inference`.

    Returns:
        A decorator; the function it returns takes the same arguments as the decorated one.

    Raises:
        TypeError: ``'`distribution` must be a callable or an instance of `Samplable`.'`` (as TorchOpt), or a wrong
            type for another argument.
        MethodError: For an unknown ``method``; it is both a ``ValueError`` and an ``AssertionError``.
        ValueError: For out-of-range ``num_samples``, ``sigma``, ``chunk_size``, ``top_k`` or ``argnums``, or a
            non-seeded ``distribution`` with ``process_group``.

    Example:
        >>> import torch
        >>> from altgrad.zero_order import zero_order
        >>> @zero_order(torch.distributions.Normal(0.0, 1.0), method="antithetic", num_samples=100, sigma=0.01)
        ... def loss(w, x):
        ...     return ((x @ w) ** 2).mean()
        >>> w = torch.ones(3, requires_grad=True)
        >>> value = loss(w, torch.randn(8, 3))
        >>> (grad,) = torch.autograd.grad(value, w)
        >>> grad.shape
        torch.Size([3])
    """
    options = EstimatorOptions(
        method,
        num_samples,
        sigma,
        chunk_size,
        batching,
        top_k,
        sample_batched,
        directions,
        rank,
        process_group,
        memory,
    )
    argnums_t = _normalise_argnums(argnums)
    check_distribution(distribution)
    source = NoiseSource(distribution, sample_batched=sample_batched)
    check_distributed_source(source, options)

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        evaluator_cache: dict[str, Any] = {"lock": threading.Lock()}

        @functools.wraps(fn)
        def apply(*args: Any, **kwargs: Any) -> Tensor:
            resolved = _resolve_argnums(argnums_t, len(args))
            # As TorchOpt (optree, none_is_leaf=False): None entries are not leaves.
            flat_all, spec = pytree.tree_flatten([args[a] for a in resolved])
            positions = [i for i, leaf in enumerate(flat_all) if leaf is not None]
            flat_params = [flat_all[i] for i in positions]
            for leaf in flat_params:
                if not isinstance(leaf, Tensor):
                    raise TypeError(
                        f"the arguments selected by `argnums` {argnums_t} must hold only tensors, found "
                        f"{type(leaf).__name__} (pass parameters as a tuple, e.g. tuple(net.parameters()))"
                    )
            if not flat_params:
                raise ValueError(f"the arguments selected by `argnums` {argnums_t} hold no tensors")
            call = _Call(
                fn, args, kwargs, resolved, flat_all, positions, spec, source, options, evaluator_cache
            )
            return ZeroOrder.apply(call, *flat_params)

        return apply

    return decorator
