"""Which batched path each parameter of a perturbed model takes, and one noise per tied parameter.

:func:`tie_noise` gives every use of a parameter (a weight tied between an ``nn.Embedding`` and the output
``Linear``, a bias shared by two layers) the noise index of its first use, so all uses see the same ``E_k`` and the
update counts it once. :func:`build_plan` lists every parameter with its path, its noise law and its population
dimension (:meth:`~altgrad.es_layers.PerturbedModel.es_plan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from .base import Perturbed

__all__ = ["Plan", "PlanEntry", "build_plan", "tie_noise"]


def _roles(unit: Perturbed) -> list[tuple[str, Tensor]]:
    out = [("weight", unit.weight)]
    if unit.bias is not None:
        out.append(("bias", unit.bias))
    return out


def tie_noise(units: Sequence[Perturbed]) -> None:
    """Give each parameter's later uses the noise index of its first use (``unit.noise_index``).

    Args:
        units: The model's perturbed layers and units, numbered (``layer_index``) in order.

    Raises:
        ValueError: If the uses of one parameter would draw different noise laws (another mode, rank, sign-flip
            side, population size or antithetic setting) or use it once as a weight and once as a bias.
    """
    first: dict[int, tuple[Perturbed, str]] = {}
    for u in units:
        index = [u.layer_index, u.layer_index]
        for slot, (role, p) in enumerate(_roles(u)):
            if id(p) not in first:
                first[id(p)] = (u, role)
                continue
            v, v_role = first[id(p)]
            if v_role != role:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is a {v_role} of {v!r} and a {role} of {u!r}; "
                    "tie weights to weights and biases to biases"
                )
            if role == "weight" and _law(u) != _law(v):
                raise ValueError(
                    f"tied weight of shape {tuple(p.shape)}: its uses would draw different noise "
                    f"({_law(v)} vs {_law(u)}); give them the same mode and options"
                )
            index[slot] = v.layer_index
        u.noise_index = None if index == [u.layer_index, u.layer_index] else (index[0], index[1])
        u._noise = {}


def _law(u: Perturbed) -> str:
    extras = ("rank", "flip", "permutation", "in_sparsity", "out_sparsity", "sparsity")
    parts = [u.mode, f"directions={u.directions}", f"antithetic={u.antithetic}", f"σ={u.noise_scale}"]
    parts += [f"{k}={getattr(u, k)}" for k in extras if hasattr(u, k)]
    groups = getattr(u, "groups", 1)
    if groups != 1:
        parts.append(f"groups={groups}")
    return ", ".join(parts)


class PlanEntry(NamedTuple):
    """One parameter of the model in :meth:`~altgrad.es_layers.PerturbedModel.es_plan`.

    Attributes:
        name: The parameter's name (its first name when tied).
        shape: Its shape.
        path: The batched path of the module using it (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``,
            ``"layer_norm"``, ``"attention"``, ``"lstm"``, ``"gru"``, ``"affine"``, ``"generic"``; ``"generic"``
            reads ``"generic (vmap)"`` or ``"generic (loop)"`` once it ran), or ``"frozen"``
            (``requires_grad=False``) or ``"not perturbed"`` (left out, for example by ``include=``).
        noise: The noise law (``"lowrank"``, ``"flipout"``, ``"iid"``, ...) or ``""``.
        population_dim: The input dimension holding the population for that module (``None`` if not perturbed).
        also: The parameter's other names (tied parameters, modules registered twice).
    """

    name: str
    shape: tuple[int, ...]
    path: str
    noise: str
    population_dim: int | None
    also: tuple[str, ...]


class Plan(list):
    """The list of :class:`PlanEntry`, one per distinct parameter; ``str(plan)`` is a table."""

    @property
    def not_perturbed(self) -> list[PlanEntry]:
        """Trainable parameters that get no perturbation (empty after :func:`~altgrad.es_layers.perturb`
        without ``include=``)."""
        return [e for e in self if e.path == "not perturbed"]

    @property
    def generic(self) -> list[PlanEntry]:
        """Parameters evaluated by the generic per-member path."""
        return [e for e in self if e.path.startswith("generic")]

    def __str__(self) -> str:
        head = ("parameter", "shape", "path", "noise", "pop. dim", "also")
        rows = [head] + [
            (
                e.name,
                "x".join(map(str, e.shape)) or "()",
                e.path,
                e.noise,
                "" if e.population_dim is None else str(e.population_dim),
                ", ".join(e.also),
            )
            for e in self
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _population_dim(owner: object) -> int:
    if hasattr(owner, "batch_first") and getattr(owner, "es_kind", "") in ("attention", "lstm", "gru"):
        return 0 if owner.batch_first else 1  # type: ignore[attr-defined]
    return int(getattr(owner, "population_dim", 0))


def build_plan(model: nn.Module, units: Sequence[Perturbed]) -> Plan:
    """One :class:`PlanEntry` per distinct parameter of ``model``, in ``named_parameters`` order.

    Args:
        model: The base model.
        units: Its perturbed layers and units.

    Returns:
        The plan.
    """
    names: dict[int, list[str]] = {}
    params: dict[int, Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    covered: dict[int, tuple[str, str, int]] = {}
    for u in units:
        owner = getattr(u, "host", u)
        path = str(getattr(u, "kind", None) or getattr(owner, "es_kind", type(owner).__name__))
        ran = getattr(owner, "es_generic_path", None)
        if path == "generic" and ran:
            path = f"generic ({ran})"
        for role, q in _roles(u):
            if id(q) not in covered:
                covered[id(q)] = (path, u.mode if role == "weight" else "iid", _population_dim(owner))
            elif path not in covered[id(q)][0].split(", "):  # a tied parameter's other uses
                prev = covered[id(q)]
                covered[id(q)] = (f"{prev[0]}, {path}", prev[1], prev[2])
    plan = Plan()
    for pid, ns in names.items():
        t = params[pid]
        if pid in covered:
            path, noise, dim = covered[pid]
            plan.append(PlanEntry(ns[0], tuple(t.shape), path, noise, dim, tuple(ns[1:])))
        else:
            path = "frozen" if not t.requires_grad else "not perturbed"
            plan.append(PlanEntry(ns[0], tuple(t.shape), path, "", None, tuple(ns[1:])))
    return plan
