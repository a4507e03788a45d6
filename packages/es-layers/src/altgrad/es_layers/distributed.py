"""Population sharding over ``torch.distributed`` ranks: only seeds and fitness values cross ranks.

Recipe (every rank runs the same code, with the same model initialisation and the same seed):

1. ``pm = PerturbedModel(model, directions, seed=broadcast_seed(...))`` and ``shard(pm)``: this rank evaluates
   ``pm.members`` (a contiguous block of the population);
2. each step: ``pm.set_noise()``, evaluate the local members (input ``(repeat_size * len(pm.members), ...)``),
   reduce to one fitness per local member;
3. ``fitness = all_gather_fitness(local_fitness, pm.members, directions)``: the whole population's fitness on every
   rank (``directions`` scalars travel);
4. ``pm.set_grad(shaping(fitness))`` and ``optimizer.step()``: every rank regenerates the noise of all members
   from the seed and applies the bit-identical update, so parameters never need to be communicated.

Works with gloo (CPU tensors) and nccl (CUDA tensors: pass fitness on the rank's device).
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
from torch import Tensor

from .model import PerturbedModel, _as_int64, _fingerprint
from .noise import Members, member_tensor

__all__ = ["RankMismatchError", "all_gather_fitness", "broadcast_seed", "shard", "shard_members"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first"
        )
    return dist


def shard_members(directions: int, rank: int, world_size: int) -> range:
    """The contiguous block of members evaluated by ``rank`` out of ``world_size`` (sizes differ by at most 1).

    Args:
        directions: Population size.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of processes.

    Returns:
        A ``range`` of member indices (possibly empty when ``world_size > directions``).

    Raises:
        ValueError: For non-positive sizes or a rank out of range.
    """
    for name, v in (("directions", directions), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(directions, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard(perturbed_model: PerturbedModel, group: Any = None) -> range:
    """Make this rank evaluate its block of the population (``shard_members`` of its rank in ``group``).

    Args:
        perturbed_model: The model to shard; its layers' ``members`` are set.
        group: Process group (default: the world).

    Returns:
        The members of this rank.

    Raises:
        RuntimeError: If ``torch.distributed`` is not initialised.
        ValueError: If the population is smaller than the number of ranks.
    """
    dist = _dist()
    world = dist.get_world_size(group)
    if perturbed_model.directions < world:
        raise ValueError(
            f"directions ({perturbed_model.directions}) must be >= the number of ranks ({world})"
        )
    members = shard_members(perturbed_model.directions, dist.get_rank(group), world)
    perturbed_model.set_members(members)
    return members


def broadcast_seed(seed: int | None = None, src: int = 0, group: Any = None) -> int:
    """Return rank ``src``'s seed on every rank (drawn from the operating system there if ``None``).

    The ranks exchange a header of the same size as :func:`all_gather_fitness`'s, tagged with what it is and the
    ``src`` each rank named: a rank that calls the other collective at this point, or names another ``src``, makes
    **every** rank raise :class:`RankMismatchError` instead of pairing a seed with fitness values.

    Args:
        seed: The seed on rank ``src`` (ignored elsewhere).
        src: Source rank (a global rank, as for ``torch.distributed.broadcast``).
        group: Process group (default: the world).

    Returns:
        The common seed (a non-negative int below ``2**63``).

    Raises:
        RankMismatchError: On every rank, if the ranks are out of step or name different sources.
        ValueError: On every rank, if ``src`` is not a rank of the group.
    """
    dist = _dist()
    world = dist.get_world_size(group)
    index = -1  # src's rank within the group
    if not isinstance(src, bool) and isinstance(src, int):
        try:
            index = src if group is None or group is dist.group.WORLD else dist.get_group_rank(group, src)
        except (ValueError, RuntimeError):  # src is not in the group
            index = -1
    ok = 0 <= index < world
    rank = dist.get_rank(group)
    value = (secrets.randbits(63) if seed is None else int(seed) % (1 << 63)) if ok and rank == index else 0
    device = _collective_device(dist, group)
    header = [_SEED_MAGIC, src if ok else -1, value, 0, 0, 0, int(ok), 0]  # _HEADER's length
    mine = torch.tensor(header, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    headers = [g.tolist() for g in gathered]
    if any(h[0] != _SEED_MAGIC for h in headers):
        shown = ", ".join(
            f"rank {r}: {'broadcast_seed' if h[0] == _SEED_MAGIC else 'another collective'}"
            for r, h in enumerate(headers)
        )
        raise RankMismatchError(f"broadcast_seed: the ranks are out of step ({shown})")
    bad = [r for r, h in enumerate(headers) if not h[6]]
    if bad:
        raise ValueError(
            f"broadcast_seed: src must be a rank of the group; rank(s) {bad} gave one that is not "
            f"(this rank: {src!r}; every rank raises)"
        )
    sources = [h[1] for h in headers]
    if len(set(sources)) > 1:
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(sources))
        raise RankMismatchError(f"broadcast_seed: the ranks name different sources ({shown})")
    return int(headers[index][2])


def _collective_device(dist: Any, group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RankMismatchError(RuntimeError):
    """The ranks of a collective disagree on what they exchange (step, population, settings, shapes).

    Raised on every rank of the group, from the same gathered headers, before any fitness value is used.
    """


# Header of one all_gather_fitness call: (name, how it is shown). Every rank sends its own and compares all.
_HEADER = (
    ("magic", "collective"),
    ("step", "noise step (-2: not given)"),
    ("directions", "population size"),
    ("seed", "noise seed"),
    ("settings", "fingerprint of the perturbed layers' settings (modes, shapes, sigma, antithetic, dtype)"),
    ("trailing", "fitness trailing shape and dtype"),
    ("ok", "validity of the local arguments"),
    ("count", "number of local members"),
)
_MAGIC = 0x45534C4649544E53 >> 1  # "ESLFITNS": identifies this collective's header
_SEED_MAGIC = 0x45534C5345454453 >> 1  # "ESLSEEDS": broadcast_seed's header (same length as _HEADER)
_NOT_GIVEN = -2


def _settings_fingerprint(model: PerturbedModel) -> int:
    parts = [f"directions={model.directions}"]
    for layer in model.perturbed_layers:
        parts.append(layer.config_key())
        parts.append(
            f"sigma={getattr(layer, '_sigma', None)!r}|seed={_as_int64(layer.seed)}|{layer.weight.dtype}"
        )
    return _fingerprint("\n".join(parts))


def _local_header(
    local_fitness: Tensor, members: Members | PerturbedModel, directions: int | None, step: int | None
) -> tuple[str | None, Tensor, int | None, int, int, int]:
    """``(problem, members, step, directions, seed, settings)`` of this rank; ``problem`` is ``None`` if valid."""
    seed = settings = _NOT_GIVEN
    empty = torch.zeros(0, dtype=torch.int64)
    if isinstance(members, PerturbedModel):
        model = members
        if directions is not None and directions != model.directions:
            return (
                f"directions={directions} differs from the model's {model.directions}",
                empty,
                None,
                0,
                0,
                0,
            )
        if step is not None:
            return "give step only with member indices (the model's step is used)", empty, None, 0, 0, 0
        if model.step is None:
            return "call set_noise() before gathering the fitness of a step", empty, None, 0, 0, 0
        directions, step = model.directions, model.step
        seed, settings = _as_int64(model.seed), _settings_fingerprint(model)
        m = model.members
    else:
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            return f"directions must be a positive int, got {directions!r}", empty, None, 0, 0, 0
        try:
            m = member_tensor(members)
        except (TypeError, ValueError) as e:
            return str(e), empty, None, 0, 0, 0
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        return f"step must be a non-negative int, got {step!r}", empty, None, 0, 0, 0
    if local_fitness.dim() == 0 or local_fitness.shape[0] != m.numel():
        problem = (
            f"local_fitness must have one row per local member ({m.numel()}), "
            f"got shape {tuple(local_fitness.shape)}"
        )
        return problem, empty, None, 0, 0, 0
    return None, m, step, directions, seed, settings


def _check_headers(headers: list[list[int]]) -> None:
    """Compare the gathered headers; raise the same error on every rank if a field differs."""
    for j, (name, what) in enumerate(_HEADER):
        if name in ("ok", "count"):
            continue
        values = [h[j] for h in headers]
        if len(set(values)) > 1:
            if name == "magic":
                detail = "another collective was paired with all_gather_fitness (ranks out of sync)"
            elif name == "step":
                detail = (
                    "a rank skipped or repeated set_noise() (for example after a failed step); every rank must "
                    "call set_noise() once per step and all_gather_fitness() once per step"
                )
            else:
                detail = "every rank must run the same model, population, seed and settings"
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise RankMismatchError(
                f"all_gather_fitness: the ranks disagree on the {what} ({shown}); {detail}"
            )


def all_gather_fitness(
    local_fitness: Tensor,
    members: Members | PerturbedModel,
    directions: int | None = None,
    group: Any = None,
    *,
    step: int | None = None,
) -> Tensor:
    """Gather every rank's per-member fitness into the full population's fitness, on every rank.

    Before any value is used, the ranks exchange a small header (noise step, population size, seed, a fingerprint
    of the perturbed layers' settings, the fitness shape and dtype) and every rank compares all of them: a
    mismatch raises :class:`RankMismatchError` on **every** rank, so no replica applies an update the others do
    not (for example when one rank skipped a failed step and is one noise step ahead).

    Args:
        local_fitness: Tensor whose first dimension has one entry per local member (``len(members)``); any
            trailing shape (for example per-repeat values) is kept.
        members: The :class:`~altgrad.es_layers.PerturbedModel` (recommended: its members, population size, step,
            seed and settings are then checked across ranks), or this rank's member indices.
        directions: Population size (taken from the model when ``members`` is one; must agree if also given).
        group: Process group (default: the world).
        step: With member indices, the noise step to check across ranks (``pm.step``); taken from the model when
            ``members`` is one. Without either, the step is not checked.

    Returns:
        Tensor of shape ``(directions, *local_fitness.shape[1:])``, row ``k`` holding member ``k``'s fitness.

    Raises:
        RankMismatchError: On every rank, if the ranks disagree on the step, population size, seed, settings or
            fitness shape/dtype.
        ValueError: If shapes do not match, or the ranks' members do not cover ``range(directions)`` exactly once.
    """
    dist = _dist()
    if not isinstance(local_fitness, Tensor):
        local_fitness = torch.as_tensor(local_fitness)
    # local problems are reported through the header, so that every rank raises instead of waiting for this one
    problem, m, step, directions, seed, settings = _local_header(local_fitness, members, directions, step)
    device = _collective_device(dist, group)
    world = dist.get_world_size(group)
    fit = local_fitness.detach().to(device)
    rest = tuple(fit.shape[1:])
    header = [
        _MAGIC,
        _NOT_GIVEN if step is None else step,
        directions,
        seed,
        settings,
        _fingerprint(f"{rest}|{fit.dtype}"),
        int(problem is None),
        m.numel(),
    ]
    mine = torch.tensor(header, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    headers = [g.tolist() for g in gathered]
    if problem is not None:
        raise ValueError(f"all_gather_fitness: {problem} (every rank raises)")
    bad = [r for r, h in enumerate(headers) if not h[-2]]
    if bad:
        raise RankMismatchError(f"all_gather_fitness: rank(s) {bad} gave invalid arguments (see their error)")
    _check_headers(headers)
    counts = [h[-1] for h in headers]
    cap = max(counts)
    pad_f = torch.zeros((cap, *rest), dtype=fit.dtype, device=device)
    pad_f[: m.numel()] = fit
    pad_m = torch.full((cap,), -1, dtype=torch.int64, device=device)
    pad_m[: m.numel()] = m.to(device)
    gathered_f = [torch.empty_like(pad_f) for _ in range(world)]
    gathered_m = [torch.empty_like(pad_m) for _ in range(world)]
    dist.all_gather(gathered_f, pad_f, group=group)
    dist.all_gather(gathered_m, pad_m, group=group)
    idx = torch.cat([g[:c] for g, c in zip(gathered_m, counts)])
    vals = torch.cat([g[:c] for g, c in zip(gathered_f, counts)])
    if idx.numel() != directions or not torch.equal(
        torch.sort(idx).values, torch.arange(directions, device=device)
    ):
        raise ValueError(f"the ranks' members must cover range({directions}) exactly once")
    out = torch.empty((directions, *rest), dtype=fit.dtype, device=device)
    out[idx] = vals
    return out.to(local_fitness.device)
