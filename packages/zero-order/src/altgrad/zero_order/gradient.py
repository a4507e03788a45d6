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

import copy
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._errors import MethodError
from ._noise import NoiseSource, compute_dtype
from .directions import DIRECTIONS, Dense, DenseNoise, Direction, Flipout, LowRank, Workspace
from .distributions import NoiseTable
from .estimators import ANTITHETIC_METHODS, METHODS, TWO_PASS_METHODS, direction_weights
from .inference import MEMORY_MODES, run_functional
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
        process_group: A ``torch.distributed`` process group to shard the population over (None: one process).
        memory: ``"batched"`` (default: members stacked and evaluated in chunks) or ``"inference"`` (members one
            after another, directions regenerated, parameters never written; see `inference`).

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
    process_group: Any = None
    memory: str = "batched"

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
        if self.process_group is not None:
            check_process_group(self.process_group)
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"`memory` must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.memory == "inference":
            if self.directions != "dense":
                raise ValueError(
                    f"memory='inference' supports directions='dense' only, got directions={self.directions!r}"
                )
            if self.process_group is not None:
                raise ValueError(
                    "memory='inference' does not shard over a `process_group`; use memory='batched'"
                )


def check_process_group(process_group: Any) -> None:
    """Raise ``TypeError`` unless ``process_group`` is a ``torch.distributed.ProcessGroup``."""
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "`process_group` must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD after "
            f"init_process_group) or None, got {type(process_group).__name__}"
        )


def check_distributed_source(source: NoiseSource, options: EstimatorOptions) -> None:
    """With a process group, the noise must be regenerable on every rank: only seeded distributions qualify."""
    if options.process_group is not None and not source.seeded:
        raise ValueError(
            "with `process_group`, `distribution` must be a seeded distribution (SeededNormal, SeededRademacher, "
            f"NoiseTable) that every rank regenerates identically; got {type(source.distribution).__name__}, whose "
            "samples cannot be reproduced on the other ranks"
        )


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
    """Direction type per leaf: dense, or low-rank / Flipout (materialised) for 2-D leaves when asked."""
    plans: list[Direction] = []
    for i, p in enumerate(params):
        if options.directions == "lowrank" and p.ndim == 2:
            plans.append(LowRank(i, len(params), options.rank))
        elif options.directions == "flipout" and p.ndim == 2:
            plans.append(Flipout(i, len(params)))
        else:
            plans.append(Dense(i))
    return plans


def run_estimate(
    evaluate: PopulationEvaluator,
    params: Sequence[Tensor],
    source: NoiseSource,
    options: EstimatorOptions,
    grad_output: Tensor | float = 1.0,
    f0: Tensor | None = None,
    plans: Sequence[Direction] | None = None,
    workspace: Workspace | None = None,
) -> list[Tensor]:
    """Core loop shared by every entry point (the arguments are already validated).

    A failed estimate (an exception or ``KeyboardInterrupt`` in the user's function, a failed allocation) consumes
    no noise step: the seeded distribution's counter is put back, so a retry draws the directions the
    uninterrupted run would have drawn.

    Args:
        evaluate: Evaluates stacked perturbed leaves.
        params: The leaves to perturb.
        source: Where directions come from.
        options: Estimator settings.
        grad_output: Incoming gradient (chain rule), a scalar.
        f0: Unperturbed value, needed by ``forward``.
        plans: Direction type per leaf (default: `default_plans`).
        workspace: Buffers for the perturbed leaves, reused across chunks (and across calls when the caller
            keeps it); None: one for this call.

    Returns:
        One gradient per leaf, in the leaf's dtype and on its device.
    """
    with source.step_on_success():
        return _run_estimate(evaluate, params, source, options, grad_output, f0, plans, workspace)


@torch.no_grad()
def _run_estimate(
    evaluate: PopulationEvaluator,
    params: Sequence[Tensor],
    source: NoiseSource,
    options: EstimatorOptions,
    grad_output: Tensor | float = 1.0,
    f0: Tensor | None = None,
    plans: Sequence[Direction] | None = None,
    workspace: Workspace | None = None,
) -> list[Tensor]:
    if plans is None:
        plans = default_plans(options, params)
    if workspace is None:
        workspace = Workspace()
    if options.process_group is not None:
        return _run_distributed(evaluate, params, source, options, grad_output, f0, plans, workspace)
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

    # one-pass methods use up each chunk's noise before drawing the next: the source may reuse its buffers (set on
    # this estimate's own copy of the source: a source shared by concurrent estimates never sees another's buffers)
    source = copy.copy(source)
    source.buffers = None if two_pass else workspace
    try:
        for members in chunks:
            noise = [plan.draw(source, p, members, step) for plan, p in zip(plans, params)]
            values = evaluate(
                [
                    x
                    for plan, p, z in zip(plans, params, noise)
                    for x in plan.inputs(p, z, sigma, antithetic, workspace)
                ]
            )
            # a copy: the values may view reused buffers (a stacked leaf, a layer output)
            values = values.detach().to(device=device, dtype=value_dtype, copy=True)
            finite &= torch.isfinite(values).all()
            f_plus, f_minus = (
                (values[: len(members)], values[len(members) :]) if antithetic else (values, None)
            )
            if two_pass:
                assert f_minus is not None  # two-pass methods are antithetic
                values_plus.append(f_plus)
                values_minus.append(f_minus)
                if not source.regenerable:
                    kept_noise.append(noise)
                continue
            weights = direction_weights(
                method, f_plus, f_minus=f_minus, f0=f0, sigma=sigma, num_directions=n_dir
            )
            for plan, grad, z in zip(plans, grads, noise):
                plan.accumulate(grad, z, weights * g)
            del noise
    finally:
        source.buffers = None

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
    if f0 is not None:
        finite &= torch.isfinite(f0)
    return _finish(grads, params, finite, g)


def _finish(grads: list[Tensor], params: Sequence[Tensor], finite: Tensor, g: Tensor) -> list[Tensor]:
    """Non-finite values never become a finite step: ranks (es), top-b selection (ars) or a zero direction
    element could otherwise hide them. Every element of every gradient is then NaN (see the docs)."""
    finite = finite & torch.isfinite(g)
    for grad in grads:
        grad.masked_fill_(~finite.to(grad.device), float("nan"))
    return [grad if grad.dtype == p.dtype else grad.to(p.dtype) for grad, p in zip(grads, params)]


def _run_distributed(
    evaluate: PopulationEvaluator,
    params: Sequence[Tensor],
    source: NoiseSource,
    options: EstimatorOptions,
    grad_output: Tensor | float,
    f0: Tensor | None,
    plans: Sequence[Direction],
    workspace: Workspace,
) -> list[Tensor]:
    """The estimate with the population sharded over ``options.process_group``.

    Rank r evaluates the contiguous block ``shard_members(N, r, world)`` of the directions (both signs for the
    antithetic methods), in chunks. The per-member values are all-gathered (for ``forward`` the differences
    f(θ+σz_k) − f(θ), so a rank's baseline stays local), after a check that every rank runs the same estimate
    (every setting that changes it: see `_settings`). Every rank then computes all weights and regenerates every
    direction from the seed, chunk by chunk as a single process does, so all ranks end with the same full gradient.

    Every exchange is a sequence of `_exchange` messages of one fixed size, each tagged with what it is (settings,
    values or failure), the estimate's number on this group and its index, and checked on every rank: a rank
    that skipped or abandoned an estimate makes every rank raise, never pairs its settings with another's
    values. A rank whose evaluation fails tells the others (a failure message in place of its values) and
    re-raises; the others raise too.
    """
    import torch.distributed as dist

    from altgrad.es_layers.distributed import shard_members

    check_distributed_source(source, options)
    pg = options.process_group
    method, n_dir, sigma = options.method, options.num_samples, options.sigma
    antithetic = method in ANTITHETIC_METHODS
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    comm = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(pg) == "nccl"
        else torch.device("cpu")
    )
    step = source.new_step()
    call = _GROUP_CALLS.get(id(pg), 0)
    _GROUP_CALLS[id(pg)] = call + 1
    per_chunk = _directions_per_chunk(options, params)
    setting_names, setting_values = zip(*_settings(options, source, step, per_chunk, grad_output, params))
    table = _exchange(pg, comm, _SETTINGS, call, torch.tensor(setting_values, dtype=torch.int64))
    for col, name in enumerate(setting_names):
        if not bool((table[:, col] == table[0, col]).all()):
            shown: list[Any] = table[:, col].tolist()
            if name == "method":
                shown = [METHODS[i] for i in shown]
            elif name in ("sigma", "grad_output"):
                shown = [_bits_float(b) for b in shown]
            elif name == "directions":
                shown = [DIRECTIONS[i] for i in shown]
            raise ValueError(f"{name} differs across the ranks of `process_group` (rank order): {shown}")
    block = shard_members(n_dir, rank, world) if n_dir >= world else range(0)
    if n_dir < world:  # every rank knows: all raise together (no rank is left waiting in a collective)
        raise ValueError(
            f"num_samples={n_dir} leaves rank {rank} of {world} without members: use num_samples >= {world} "
            "(the size of `process_group`)"
        )
    check_sigma_resolution(params, plans, sigma)
    value_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = params[0].device
    width = -(-n_dir // world)  # the largest block
    rows = 2 if antithetic else 1
    try:
        local_plus: list[Tensor] = []
        local_minus: list[Tensor] = []
        for members, noise in _local_chunks(plans, params, source, block, n_dir, per_chunk, step):
            values = evaluate(
                [
                    x
                    for plan, p, z in zip(plans, params, noise)
                    for x in plan.inputs(p, z, sigma, antithetic, workspace)
                ]
            )
            # a copy: the values may view reused buffers
            values = values.detach().to(device=device, dtype=value_dtype, copy=True)
            del noise
            local_plus.append(values[: len(members)])
            if antithetic:
                local_minus.append(values[len(members) :])
        plus = torch.cat(local_plus)
        if method == "forward":
            assert f0 is not None
            plus = plus - f0.detach().to(device=device, dtype=value_dtype)
        send = torch.full((rows, width), float("nan"), dtype=torch.float64)
        send[0, : len(block)] = plus.to("cpu", torch.float64)
        if antithetic:
            send[1, : len(block)] = torch.cat(local_minus).to("cpu", torch.float64)
    except BaseException:
        _exchange(pg, comm, _FAILURE, call, torch.zeros(0, dtype=torch.int64), failed=True)
        raise
    received = _exchange(pg, comm, _VALUES, call, send.reshape(-1).view(torch.int64))
    received = received.view(torch.float64).reshape(world, rows, width)
    blocks = [shard_members(n_dir, r, world) for r in range(world)]
    gathered = [
        torch.cat([received[r, i, : len(b)] for r, b in enumerate(blocks)]).to(device, value_dtype)
        for i in range(rows)
    ]
    f_plus, f_minus = gathered[0], (gathered[1] if antithetic else None)
    finite = torch.isfinite(f_plus).all()
    if f_minus is not None:
        finite &= torch.isfinite(f_minus).all()
    g = torch.as_tensor(grad_output, dtype=value_dtype).to(device)
    weights = direction_weights(
        method,
        f_plus,
        f_minus=f_minus,
        f0=torch.zeros((), dtype=value_dtype, device=device),
        sigma=sigma,
        num_directions=n_dir,
        top_k=options.top_k,
    )
    weights = weights * g
    grads = [torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device) for p in params]
    for start in range(0, n_dir, per_chunk):
        members = range(start, min(n_dir, start + per_chunk))
        w = weights[members.start : members.stop]
        for plan, grad, p in zip(plans, grads, params):
            plan.accumulate(grad, plan.draw(source, p, members, step), w)
    return _finish(grads, params, finite, g)


def _local_chunks(
    plans: Sequence[Direction],
    params: Sequence[Tensor],
    source: NoiseSource,
    block: range,
    n_dir: int,
    per_chunk: int,
    step: int,
) -> Any:
    """This rank's members in chunks, with their noise: the parts of the single process's chunks that fall in
    ``block``. A `NoiseTable` keys its windows by chunk, so a part is cut from its whole chunk's draw (a view):
    every rank evaluates the directions a single process would, and the update regenerates them."""
    by_chunk = isinstance(source.distribution, NoiseTable)
    for start in range(0, n_dir, per_chunk):
        chunk = range(start, min(n_dir, start + per_chunk))
        members = range(max(chunk.start, block.start), min(chunk.stop, block.stop))
        if not members:
            continue
        if not by_chunk or members == chunk:
            yield members, [plan.draw(source, p, members, step) for plan, p in zip(plans, params)]
            continue
        lo, hi = members.start - chunk.start, members.stop - chunk.start
        yield members, [_rows(plan.draw(source, p, chunk, step), lo, hi) for plan, p in zip(plans, params)]


def _rows(noise: Any, lo: int, hi: int) -> Any:
    """Members ``lo:hi`` of a chunk's noise (`Dense`, `LowRank` or `Flipout`, whose shared matrix stays)."""
    if isinstance(noise, DenseNoise):
        return DenseNoise(noise.z[lo:hi], fresh=False)
    if len(noise) == 3:  # Flipout: (S, out signs, in signs)
        return (noise[0], noise[1][lo:hi], noise[2][lo:hi])
    return tuple(t[lo:hi] for t in noise)


#: Distributed estimates started per process group (by id) in this process: every message carries the number.
_GROUP_CALLS: dict[int, int] = {}
#: Every message of a distributed estimate has this many int64 slots (a fixed size: gloo and NCCL never see two
#: ranks pass messages of different sizes, whatever state they are in); the first `_TAG` identify it.
_FRAME = 64
_TAG = 4
_SETTINGS, _VALUES, _FAILURE = 0x5A4F01, 0x5A4F02, 0x5A4F03
_KIND_NAMES = {_SETTINGS: "its settings", _VALUES: "its values", _FAILURE: "a failure"}


def _settings(
    options: EstimatorOptions,
    source: NoiseSource,
    step: int,
    per_chunk: int,
    grad_output: Tensor | float,
    params: Sequence[Tensor],
) -> list[tuple[str, int]]:
    """Everything that changes a distributed estimate, as named int64 values compared across the ranks."""
    d = source.distribution
    shapes = repr([(tuple(p.shape), str(p.dtype)) for p in params])
    # any further option (added later) is covered by this fingerprint; batching and chunk_size change rounding
    # only, and the chunk grid is compared as "directions per chunk"
    others = {
        f.name: getattr(options, f.name)
        for f in options.__dataclass_fields__.values()
        if f.name
        not in (
            "process_group",
            "batching",
            "chunk_size",
            "method",
            "num_samples",
            "sigma",
            "directions",
            "rank",
            "top_k",
        )
    }
    return [
        ("num_samples", options.num_samples),
        ("estimate step", step),
        ("seed", int(getattr(d, "seed", 0)) & ((1 << 63) - 1)),
        ("distribution", zlib.crc32(repr(d).encode())),
        ("method", METHODS.index(options.method)),
        ("sigma", _float_bits(options.sigma)),
        ("directions", DIRECTIONS.index(options.directions)),
        ("rank", options.rank if options.directions == "lowrank" else 0),
        ("top_k", options.top_k or 0),
        ("directions per chunk", per_chunk),
        ("grad_output", _float_bits(float(grad_output))),
        ("parameter shapes and dtypes", zlib.crc32(shapes.encode())),
        ("other settings", zlib.crc32(repr(sorted(others.items())).encode())),
    ]


def _exchange(
    pg: Any, comm: torch.device, kind: int, call: int, body: Tensor, failed: bool = False
) -> Tensor:
    """All-gather ``body`` (int64, the same length on every rank) in fixed-size tagged messages.

    Each message is ``[kind, call, index, count, body slice...]``; after each all-gather every rank checks that all
    ranks sent the same kind of message of the same estimate at the same index, and raises otherwise: every rank
    sees the same gathered messages, so all raise together. ``failed=True`` sends one failure message (the
    caller re-raises its own error).

    Returns:
        ``(world, len(body))`` int64 on the CPU, row r from rank r.
    """
    import torch.distributed as dist

    per = _FRAME - _TAG
    count = max(1, -(-body.numel() // per))
    world = dist.get_world_size(pg)
    pieces = []
    for index in range(count):
        piece = body[index * per : (index + 1) * per]
        message = torch.zeros(_FRAME, dtype=torch.int64)
        message[:_TAG] = torch.tensor([kind, call, index, count])
        message[_TAG : _TAG + piece.numel()] = piece
        message = message.to(comm)
        received = [torch.empty_like(message) for _ in range(world)]
        dist.all_gather(received, message, group=pg)
        table = torch.stack(received).cpu()
        tags = table[:, :_TAG].tolist()
        if failed:
            return table[:, _TAG:_TAG]
        failures = [r for r, t in enumerate(tags) if t[0] == _FAILURE]
        if failures:
            raise RuntimeError(
                f"rank(s) {failures} of `process_group` failed during distributed estimate {call} (their error is "
                "raised there); this rank stops the estimate too, consuming no noise step"
            )
        if any(t != tags[0] for t in tags):
            shown = ", ".join(
                f"rank {r}: {_KIND_NAMES.get(t[0], f'unknown message {t[0]}')} of estimate {t[1]} "
                f"(message {t[2] + 1}/{t[3]})"
                for r, t in enumerate(tags)
            )
            raise RuntimeError(
                "the ranks of `process_group` are out of step (a rank skipped, abandoned or repeated an estimate, "
                f"or called the collectives in another order): {shown}"
            )
        pieces.append(table[:, _TAG : _TAG + piece.numel()])
    return torch.cat(pieces, dim=1)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


class SigmaResolutionWarning(UserWarning):
    """σ is at or below the spacing of the parameter's dtype at the parameter's scale (perturbations are lost)."""


def check_sigma_resolution(params: Sequence[Tensor], plans: Sequence[Direction | None], sigma: float) -> None:
    """Warn when ``θ ± σz`` cannot be represented in a leaf's dtype (issue: bf16, σ = 1e-4, |θ| = 1).

    A perturbation applied in the parameter's dtype is rounded to multiples of ``eps·|θ|``; when σ is at most
    ``eps(dtype)·max|θ|`` a unit direction moves the largest elements by one ulp or less, and the estimate comes out
    zero or shrunken. Leaves whose perturbation is applied to activations (factored low-rank, Flipout) are skipped.

    Raises:
        SigmaResolutionWarning: (as a warning) naming sigma, the dtype, the leaf and its scale.
    """
    checked = [
        (i, p) for i, (p, plan) in enumerate(zip(params, plans)) if not getattr(plan, "factored", False)
    ]
    if not checked:
        return
    # the scale is the largest finite |θ| (non-finite parameters give a NaN estimate anyway): one reduction per
    # leaf and one host sync; leaves holding inf/NaN are reduced again without them
    checked = [(i, p) for i, p in checked if p.numel()]
    if not checked:
        return
    maxima = torch.stack([p.detach().abs().amax().to(torch.float64).cpu() for _, p in checked]).tolist()
    for k, (_, p) in enumerate(checked):
        if not math.isfinite(maxima[k]):
            maxima[k] = torch.nan_to_num(p.detach().abs(), nan=0.0, posinf=0.0).amax().item()
    scales = iter(maxima)
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
    process_group: Any = None,
    memory: str = "batched",
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
        process_group: A ``torch.distributed`` process group: each rank evaluates a contiguous block of the
            members, only the per-member values are all-gathered, and every rank regenerates all directions from
            the seed and returns the same full estimate. Needs a seeded ``distribution``. None: one process.
        memory: ``"batched"`` (default) or ``"inference"``: members evaluated one after another with one
            perturbed copy of ``params``, directions regenerated from their seed and never stored, ``params``
            never written (``chunk_size``/``batching`` are unused; see `inference`).

    Returns:
        One gradient estimate per parameter tensor.

    Raises:
        TypeError: If ``distribution`` is neither Samplable nor callable, ``params`` holds a non-tensor, or
            ``process_group`` is not a ProcessGroup.
        ValueError: For invalid settings, an empty ``params``, a non-seeded distribution with ``process_group``,
            a rank left without members (``num_samples`` < group size) or settings that differ across ranks.

    Example:
        >>> import torch
        >>> from altgrad.zero_order import estimate_gradient, SeededNormal
        >>> a = torch.tensor([1.0, -2.0])
        >>> (g,) = estimate_gradient(lambda t: a @ t, [torch.zeros(2)], SeededNormal(0), "antithetic", 4000)
        >>> torch.allclose(g, a, atol=0.1)
        True
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
    source = NoiseSource(distribution, sample_batched=sample_batched)
    check_distributed_source(source, options)
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
    if memory == "inference":
        with source.step_on_success():
            return tuple(run_functional(fn, params, source, options, grad_output, f0))
    evaluate = PopulationEvaluator(fn, batching)
    return tuple(run_estimate(evaluate, params, source, options, grad_output, f0))
