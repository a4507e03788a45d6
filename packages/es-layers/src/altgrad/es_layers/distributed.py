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

from .model import PerturbedModel
from .noise import Members, member_tensor

__all__ = ["all_gather_fitness", "broadcast_seed", "shard", "shard_members"]


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

    Args:
        seed: The seed on rank ``src`` (ignored elsewhere).
        src: Source rank.
        group: Process group (default: the world).

    Returns:
        The common seed (a non-negative int below ``2**63``).
    """
    dist = _dist()
    value = secrets.randbits(63) if seed is None else int(seed) % (1 << 63)
    device = _collective_device(dist, group)
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src, group=group)
    return int(t.item())


def _collective_device(dist: Any, group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_fitness(local_fitness: Tensor, members: Members, directions: int, group: Any = None) -> Tensor:
    """Gather every rank's per-member fitness into the full population's fitness, on every rank.

    Args:
        local_fitness: Tensor whose first dimension has one entry per local member (``len(members)``); any
            trailing shape (for example per-repeat values) is kept.
        members: This rank's member indices.
        directions: Population size.
        group: Process group (default: the world).

    Returns:
        Tensor of shape ``(directions, *local_fitness.shape[1:])``, row ``k`` holding member ``k``'s fitness.

    Raises:
        ValueError: If shapes do not match, or the ranks' members do not cover ``range(directions)`` exactly once.
    """
    dist = _dist()
    if not isinstance(local_fitness, Tensor):
        local_fitness = torch.as_tensor(local_fitness)
    m = member_tensor(members)
    if local_fitness.dim() == 0 or local_fitness.shape[0] != m.numel():
        raise ValueError(
            f"local_fitness must have one row per local member ({m.numel()}), got shape {tuple(local_fitness.shape)}"
        )
    device = _collective_device(dist, group)
    world = dist.get_world_size(group)
    fit = local_fitness.detach().to(device)
    sizes = torch.tensor([m.numel()], dtype=torch.int64, device=device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    counts = [int(s.item()) for s in all_sizes]
    cap = max(counts)
    rest = tuple(fit.shape[1:])
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
