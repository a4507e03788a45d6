"""Evaluate a population given from outside (ask/tell): per-member parameter deltas supplied by the caller.

ES algorithms that adapt their search distribution (PGPE, SNES, separable CMA-ES in EvoTorch or evosax) sample
the population themselves. :func:`population` lets them use the batched forward of the perturbed layers: inside
the block, member ``k`` of the perturbed forward computes the model with parameters ``θ + δ_k``, where ``δ_k`` is
given per parameter either densely or, for a weight matrix or conv kernel, as low-rank factors
``δ_k = A_k B_kᵀ`` (EGGROLL-style). Every layer accepts both forms, whatever its own mode: Linear and Conv2d
layers run the IID forward on dense deltas and the low-rank forward on factors; the modules perturbed in place
(attention, LSTM/GRU, Embedding, LayerNorm, Conv1d, the generic path) and ``PerturbedAffine`` read the deltas as
their noise (factors stay factors where the parameter's noise is low-rank, and are multiplied out elsewhere). The
seeded noise, the step and the update are untouched: the algorithm computes its own update.

Example (EvoTorch's functional PGPE; ``examples/es_evotorch_pgpe.py`` runs it on CartPole)::

    params = es.perturbed_parameters(pm)
    values = pgpe_ask(state, popsize=pm.directions)  # (P, D) parameter vectors
    with es.population(pm, es.deltas_from_vectors(pm, values)):
        fitness = evaluate(pm)  # the forward evaluates member k with parameters values[k]
    state = pgpe_tell(state, values, fitness)
    torch.nn.utils.vector_to_parameters(state.optimizer_state.center, params.values())
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as EF
from .affine import PerturbedAffine
from .model import PerturbedModel
from .modes import LowRankNoise
from .units import ParamUnit

__all__ = ["Delta", "deltas_from_vectors", "perturbed_parameters", "population"]

#: One parameter's deltas: dense ``(P, *param.shape)``, or low-rank factors ``(A, B)`` with ``A`` of shape
#: ``(P, param.shape[0], r)`` and ``B`` of shape ``(P, prod(param.shape[1:]), r)``, ``δ_k = A_k B_kᵀ``.
Delta = Tensor | tuple[Tensor, Tensor]

_MISSING = object()


def _supported(layer: Any) -> bool:
    """Linear/Conv2d layers (own population forward) and the layers whose forward reads noise in a mode's
    format (PerturbedAffine, the units of modules perturbed in place: attention, LSTM/GRU, Embedding, ...)."""
    return isinstance(layer, (nn.Linear, nn.Conv2d, PerturbedAffine, ParamUnit))


def perturbed_parameters(model: PerturbedModel) -> dict[str, nn.Parameter]:
    """The parameters a population moves: weights and biases of the perturbed layers, by qualified name.

    In ``model.model.named_parameters()`` order; a parameter tied across several layers appears once (every use
    gets its delta). ``torch.nn.utils.parameters_to_vector(perturbed_parameters(pm).values())`` is the layout of
    the vectors :func:`deltas_from_vectors` takes.

    Args:
        model: The perturbed model.

    Returns:
        A dict from name to parameter.
    """
    owned = {
        id(p)
        for layer in model.perturbed_layers
        for p in (getattr(layer, "weight", None), getattr(layer, "bias", None))
        if isinstance(p, Tensor)
    }
    return {name: p for name, p in model.model.named_parameters() if id(p) in owned}


def deltas_from_vectors(model: PerturbedModel, solutions: Tensor) -> dict[str, Tensor]:
    """Per-parameter dense deltas ``solutions[k] - θ`` from flat parameter vectors (EvoTorch/evosax populations).

    Args:
        model: The perturbed model; ``θ`` is its current parameters.
        solutions: ``(P, D)`` parameter vectors laid out as
            ``parameters_to_vector(perturbed_parameters(model).values())``.

    Returns:
        ``{name: (P, *param.shape)}`` in the parameters' dtype and device.

    Raises:
        ValueError: If ``solutions`` is not ``(P, D)`` with ``D`` the number of perturbed parameter values.
    """
    params = perturbed_parameters(model)
    total = sum(p.numel() for p in params.values())
    if not isinstance(solutions, Tensor) or solutions.dim() != 2 or solutions.shape[1] != total:
        shape = tuple(solutions.shape) if isinstance(solutions, Tensor) else type(solutions).__name__
        raise ValueError(
            f"solutions must have shape (P, {total}) (one parameter vector per member), got {shape}"
        )
    out = {}
    start = 0
    with torch.no_grad():
        for name, p in params.items():
            block = solutions[:, start : start + p.numel()].to(dtype=p.dtype, device=p.device)
            out[name] = block.reshape(solutions.shape[0], *p.shape) - p
            start += p.numel()
    return out


def _check_delta(name: str, p: Tensor, delta: Any, directions: int) -> tuple[Tensor | None, tuple | None]:
    """``(dense, None)`` or ``(None, (A, B))`` in ``p``'s dtype/device, after checking the shapes."""
    if isinstance(delta, Tensor):
        if delta.shape != (directions, *p.shape):
            raise ValueError(
                f"deltas[{name!r}] must have shape {(directions, *p.shape)} (one delta per member), "
                f"got {tuple(delta.shape)}"
            )
        if not delta.dtype.is_floating_point:
            raise TypeError(f"deltas[{name!r}] must be a floating-point tensor, got {delta.dtype}")
        return delta.to(dtype=p.dtype, device=p.device), None
    if isinstance(delta, (tuple, list)) and len(delta) == 2 and all(isinstance(t, Tensor) for t in delta):
        a, b = delta
        if p.dim() < 2:
            raise ValueError(
                f"deltas[{name!r}]: low-rank factors need a weight matrix or kernel, not {tuple(p.shape)}"
            )
        fan_in = math.prod(p.shape[1:])
        if (
            a.dim() != 3
            or b.dim() != 3
            or a.shape[:2] != (directions, p.shape[0])
            or b.shape[:2]
            != (
                directions,
                fan_in,
            )
            or a.shape[2] != b.shape[2]
        ):
            raise ValueError(
                f"deltas[{name!r}] as factors (A, B) must have shapes ({directions}, {p.shape[0]}, r) and "
                f"({directions}, {fan_in}, r), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise TypeError(f"deltas[{name!r}]: factors must be floating-point tensors")
        return None, (a.to(dtype=p.dtype, device=p.device), b.to(dtype=p.dtype, device=p.device))
    raise TypeError(
        f"deltas[{name!r}] must be a tensor (P, *shape) or a pair of factor tensors (A, B), got {type(delta).__name__}"
    )


def _dense(delta: tuple, shape: tuple[int, ...]) -> Tensor:
    """Dense deltas ``(P, *shape)`` from a checked delta (factors are multiplied out: ``A_k B_kᵀ``)."""
    dense, factors = delta
    if dense is not None:
        return dense
    a, b = factors
    return EF.lowrank_dense(a, b, shape)


def _rows(t: Any, members: Any, directions: int) -> Any:
    """The rows of the members this process evaluates."""
    if t is None or (members.numel() == directions and bool(torch.equal(members, torch.arange(directions)))):
        return t
    return t.index_select(0, members.to(t.device))


def _layer_forward(layer: Any, weight: tuple, bias: Tensor | None, directions: int):
    """The population forward of a Linear or Conv2d ``layer`` with the given deltas (replaces the mode's forward
    inside the block); ``None`` for the other layers, whose forward reads the deltas as noise of a mode."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return None
    members = layer.members
    dense, factors = weight
    eps = _rows(bias, members, directions)
    a: Any = None
    b: Any = None
    if factors is not None:
        a, b = (_rows(t, members, directions) for t in factors)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:  # no grouped low-rank conv: materialise A Bᵀ
            dense, a, b = _dense((None, (a, b)), tuple(layer.weight.shape)), None, None
    else:
        dense = _rows(dense, members, directions)
    if isinstance(layer, nn.Linear):

        def linear(x: Tensor, noise: dict) -> Tensor:
            if a is not None:
                return EF.lowrank_linear(x, layer.weight, layer.bias, a, b, eps)
            return EF.perturbed_linear(x, layer.weight, layer.bias, dense, eps)

        return linear

    def conv(x: Tensor, noise: dict, conv: dict) -> Tensor:
        if a is not None:
            return EF.lowrank_conv2d(x, layer.weight, layer.bias, a, b, eps, **conv)
        return EF.perturbed_conv2d(x, layer.weight, layer.bias, dense, eps, groups=layer.groups, **conv)

    return conv


def _plan(
    model: PerturbedModel, deltas: Mapping[str, Delta]
) -> list[tuple[Any, Any, dict[str, Any], str | None]]:
    """Check every delta, then build ``(layer, forward, noise, mode)`` per perturbed layer; changes nothing."""
    if not isinstance(model, PerturbedModel):
        raise TypeError(f"model must be a PerturbedModel, got {type(model).__name__}")
    if not isinstance(deltas, Mapping):
        raise TypeError(f"deltas must be a dict from parameter name to deltas, got {type(deltas).__name__}")
    unsupported = [type(layer).__name__ for layer in model.perturbed_layers if not _supported(layer)]
    if unsupported:
        raise ValueError(f"population(): no explicit-population path for {sorted(set(unsupported))}")
    params = perturbed_parameters(model)
    unknown = sorted(set(deltas) - set(params))
    if unknown:
        others = {name for name, _ in model.model.named_parameters()}
        what = "not perturbed by any layer" if set(unknown) <= others else "not parameters of the model"
        raise ValueError(f"deltas: {unknown} are {what}; the perturbed parameters are {list(params)}")
    missing = [name for name in params if name not in deltas]
    if missing:
        raise ValueError(
            f"deltas: missing {missing} (give a delta, possibly zeros, for every perturbed parameter)"
        )
    n = model.directions
    checked = {id(p): _check_delta(name, p, deltas[name], n) for name, p in params.items()}
    plan = []
    for layer in model.perturbed_layers:
        weight = checked[id(layer.weight)]
        bias = None if layer.bias is None else _dense(checked[id(layer.bias)], layer.bias.shape)
        forward = _layer_forward(layer, weight, bias, n)
        noise: dict[str, Any] = {}
        mode = None
        if forward is None:  # the deltas become the layer's noise: low-rank factors, or dense IID noise
            if weight[1] is not None and isinstance(layer, LowRankNoise):
                mode = "lowrank"
                noise["A"], noise["B"] = (_rows(t, layer.members, n) for t in weight[1])
            else:
                mode = "iid"
                noise["weight"] = _rows(_dense(weight, tuple(layer.weight.shape)), layer.members, n)
            if bias is not None:
                noise["bias"] = _rows(bias, layer.members, n)
        plan.append((layer, forward, noise, mode))
    return plan


@contextlib.contextmanager
def population(model: PerturbedModel, deltas: Mapping[str, Delta]) -> Iterator[None]:
    """Inside the block, the perturbed forward evaluates member ``k`` with parameters ``θ + δ_k``.

    ``θ`` is the model's current parameters and ``δ_k`` the caller's deltas. Every repeat of member ``k`` uses
    ``+δ_k`` (antithetic sign flips are off: give the mirrored members explicitly, as PGPE's symmetric sampling
    does). On a shard (``set_members``), the rows of this process's members are used. Outside the block, and
    after an exception inside it, every layer is exactly as before (seeded noise, step, antithetic flags).

    Args:
        model: The perturbed model (any mode, any layer kind ``perturb`` produces).
        deltas: ``{name: delta}`` for every name of :func:`perturbed_parameters` (tied parameters once): a dense
            ``(P, *shape)`` tensor, or for a weight matrix or kernel low-rank factors ``(A, B)`` of shapes
            ``(P, shape[0], r)`` and ``(P, prod(shape[1:]), r)`` (``δ_k = A_k B_kᵀ``), with ``P = directions``.

    Raises:
        ValueError: For a missing, unknown or misshaped delta, or a layer kind without an explicit path
            (checked before anything changes).
        TypeError: For deltas that are not floating-point tensors.
    """
    plan = _plan(model, deltas)
    attrs = ("_population_forward", "_current_noise", "mode", "antithetic", "es_explicit")
    saved = []
    try:
        for layer, forward, noise, mode in plan:
            saved.append((layer, [layer.__dict__.get(a, _MISSING) for a in attrs]))
            if forward is not None:
                layer.__dict__["_population_forward"] = forward
            if mode is not None:
                layer.__dict__["mode"] = mode
            layer.__dict__["_current_noise"] = lambda noise=noise: noise
            layer.__dict__["antithetic"] = False
            layer.__dict__["es_explicit"] = (
                True  # member k is exactly θ + δ_k (an Embedding's padding row too)
            )
        yield
    finally:
        for layer, old in reversed(saved):
            for attr, value in zip(attrs, old):
                if value is _MISSING:
                    layer.__dict__.pop(attr, None)
                else:
                    layer.__dict__[attr] = value
