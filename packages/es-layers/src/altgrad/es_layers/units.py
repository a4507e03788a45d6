"""Perturbation units: the noise of one parameter (and its bias) of a module perturbed in place.

``perturb`` converts ``nn.Linear``/``nn.Conv2d`` into the layer classes of :mod:`~altgrad.es_layers.linear` and
:mod:`~altgrad.es_layers.conv`. Every other module kind keeps its object, its parameters and its ``state_dict``
names: its class is swapped for a subclass (a *host*, :class:`UnitHost`) whose population forward reads the noise
of its *units*. A unit is a :class:`~altgrad.es_layers.base.Perturbed` (same seeds, steps, members, chunked update
and noise positions as a layer) that is not a module: it names one ``weight`` parameter of its host and optionally
the ``bias`` added to that weight's product.

**Noise law of a parameter.** A parameter with two or more dimensions gets the model's mode (``lowrank``,
``flipout``, ``permuted``, ``sparse`` for 2-D, ``iid``); a vector or scalar gets IID noise. The noise is a pure
function of ``(seed, step, index, member)``, so every use of a tied parameter sees the same ``E_k``
(:class:`~altgrad.es_layers.PerturbedModel` gives tied units the same index).

This module also holds the one dispatch from a unit's mode to :mod:`altgrad.es_layers.functional` for the
products the hosts need (:func:`unit_linear`, :func:`unit_conv1d`, :func:`unit_rows`, :func:`unit_dense`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import functional as EF
from .base import Perturbed
from .modes import FlipoutNoise, IIDNoise, LowRankNoise, PermutedNoise, SparseNoise

__all__ = ["ParamUnit", "UnitHost", "make_unit", "unit_conv1d", "unit_dense", "unit_linear", "unit_rows"]

#: Options of :func:`~altgrad.es_layers.perturb` read by each mode's noise.
MODE_OPTIONS = {
    "iid": (),
    "sparse": ("sparsity",),
    "permuted": ("permutation", "in_sparsity", "out_sparsity"),
    "flipout": ("flip",),
    "lowrank": ("rank",),
}
_DEFAULTS = {
    "sparsity": "auto",
    "permutation": "auto",
    "in_sparsity": 0,
    "out_sparsity": 0,
    "flip": "auto",
    "rank": 1,
}


class ParamUnit(Perturbed):
    """The noise of one parameter ``weight`` (plus an optional ``bias``) of a host module.

    Not an ``nn.Module``: the parameters stay registered where they were; the unit reads them from its host by
    name, so ``.to()``, ``state_dict`` and optimizers see the original module.

    Attributes:
        host: The module owning the parameters.
        weight_name: Qualified name of the weight inside ``host`` (for example ``"in_proj_weight"``).
        bias_name: Name of the bias, or ``None``.
        kind: The batched path the host runs (``"attention"``, ``"lstm"``, ``"embedding"``, ``"generic"``, ...).
        es_explicit: True while :func:`~altgrad.es_layers.population` supplies the members' deltas.
    """

    es_explicit = False

    def _init_unit(
        self,
        host: nn.Module,
        weight_name: str,
        bias_name: str | None,
        kind: str,
        directions: int,
        antithetic: bool,
        noise_scale: float,
        options: dict[str, Any] | None,
        groups: int = 1,
    ) -> None:
        self.host = host
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.kind = kind
        if groups != 1:
            self.groups = groups
        self._init_perturbed(directions, antithetic, noise_scale, 0, options)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The perturbed parameter."""
        return self.host.get_parameter(self.weight_name)

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        """The bias whose noise this unit also draws, or ``None``."""
        return None if self.bias_name is None else self.host.get_parameter(self.bias_name)

    def dense_noise(self, members: Any = None) -> tuple[Tensor, Tensor | None]:
        """As :meth:`Perturbed.dense_noise`; an Embedding's ``padding_idx`` row is zero (its forward never reads the
        perturbed row; a tied use elsewhere reads it through its own unit)."""
        e, eps = super().dense_noise(members)
        pad = getattr(self.host, "padding_idx", None) if self.kind == "embedding" else None
        if pad is not None and not self.es_explicit:
            e = e.index_fill(1, torch.tensor([pad], device=e.device), 0)  # a copy: the noise is not written
        return e, eps

    def __repr__(self) -> str:
        bias = f", bias={self.bias_name!r}" if self.bias_name else ""
        return (
            f"{type(self).__name__}({self.weight_name!r}{bias}, kind={self.kind!r}, {self._perturbed_repr()})"
        )


class IIDUnit(IIDNoise, ParamUnit):
    """A unit with independent Gaussian noise."""


class SparseUnit(SparseNoise, ParamUnit):
    """A unit whose 2-D weight has ``sparsity`` perturbed input columns per member."""


class PermutedUnit(PermutedNoise, ParamUnit):
    """A unit with one shared noise matrix, permuted per member."""


class FlipoutUnit(FlipoutNoise, ParamUnit):
    """A unit with one shared noise matrix and per-member sign flips (Flipout)."""


class LowRankUnit(LowRankNoise, ParamUnit):
    """A unit with rank-``r`` noise ``σ/√r · A_k B_kᵀ`` (EGGROLL)."""


_UNITS: dict[str, type[ParamUnit]] = {
    "iid": IIDUnit,
    "sparse": SparseUnit,
    "permuted": PermutedUnit,
    "flipout": FlipoutUnit,
    "lowrank": LowRankUnit,
}


def noise_mode(mode: str, param: Tensor, groups: int = 1) -> str:
    """The mode a parameter's noise follows: the model's for matrices and kernels, IID for vectors and scalars.

    Sparse noise needs a 2-D weight; low-rank and permuted noise need ``groups == 1``: otherwise IID.
    """
    if param.dim() < 2 or (mode == "sparse" and param.dim() != 2):
        return "iid"
    if groups != 1 and mode in ("lowrank", "permuted", "sparse"):
        return "iid"
    return mode


def make_unit(
    mode: str,
    host: nn.Module,
    weight_name: str,
    bias_name: str | None,
    kind: str,
    directions: int,
    options: dict[str, Any],
    groups: int = 1,
) -> ParamUnit:
    """Build the unit of ``host.<weight_name>`` (and ``bias_name``) following :func:`noise_mode`.

    Args:
        mode: The model's mode (``"iid"``, ``"sparse"``, ``"permuted"``, ``"flipout"``, ``"lowrank"``).
        host: The module owning the parameters.
        weight_name: Name of the weight in ``host``.
        bias_name: Name of the bias in ``host`` or ``None``.
        kind: Plan label of the host's batched path.
        directions: Population size.
        options: ``perturb``'s options (``antithetic``, ``noise_scale``, ``options`` and the mode's own).
        groups: Convolution groups of the weight (1 otherwise).

    Returns:
        The unit.
    """
    weight = host.get_parameter(weight_name)
    law = noise_mode(mode, weight, groups)
    unit: Any = _UNITS[law].__new__(_UNITS[law])
    unit._init_unit(
        host,
        weight_name,
        bias_name,
        kind,
        directions,
        options.get("antithetic", True),
        options.get("noise_scale", 0.01),
        options.get("options"),
        groups,
    )
    own = {k: options.get(k, _DEFAULTS[k]) for k in MODE_OPTIONS[law]}
    if law == "sparse":
        unit._init_sparse(own["sparsity"])
    elif law == "permuted":
        unit._init_permuted(own["permutation"], own["in_sparsity"], own["out_sparsity"])
    elif law == "flipout":
        unit._init_flipout(own["flip"])
    elif law == "lowrank":
        unit._init_lowrank(own["rank"])
    return unit


# ----------------------------------------------------------------------------- products (one dispatch per mode)
def unit_linear(unit: ParamUnit, x: Tensor) -> Tensor:
    """Population forward ``x (W + c E_k)ᵀ + b + c ε_k`` of a unit holding a ``(out, in)`` weight.

    Args:
        unit: The unit (its weight and bias are used).
        x: ``(R * n, *, in)``, member index fastest.

    Returns:
        ``(R * n, *, out)``.
    """
    unit._repeats(x.shape)
    noise = unit._current_noise()
    w, b, nb, anti = unit.weight, unit.bias, noise.get("bias"), unit.antithetic
    mode = unit.mode
    if mode == "iid":
        return EF.perturbed_linear(x, w, b, noise["weight"], nb, antithetic=anti)
    if mode == "lowrank":
        return EF.lowrank_linear(x, w, b, noise["A"], noise["B"], nb, antithetic=anti)
    if mode == "flipout":
        args = (noise["shared_weight"], noise.get("in_sign"), noise.get("out_sign"), nb)
        return EF.flipout_linear(x, w, b, *args, antithetic=anti)
    if mode == "permuted":
        args = (noise["shared_weight"], noise.get("in_idx"), noise.get("out_idx"), nb)
        return EF.permuted_linear(x, w, b, *args, antithetic=anti, out_inv=noise.get("out_inv"))
    return EF.sparse_linear(x, w, b, noise["cols"], noise["values"], nb, antithetic=anti)


def unit_conv1d(unit: ParamUnit, x: Tensor, stride: int, padding: Any, dilation: int, groups: int) -> Tensor:
    """Population forward of a unit holding a Conv1d kernel ``(out, in / groups, k)``: the 2-D path on ``H = 1``.

    Args:
        unit: The unit.
        x: ``(R * n, C_in, L)``, member index fastest.
        stride: As ``F.conv1d`` (an int).
        padding: As ``F.conv1d`` (an int or ``"same"``/``"valid"``).
        dilation: As ``F.conv1d`` (an int).
        groups: As ``F.conv1d``.

    Returns:
        ``(R * n, C_out, L_out)``.
    """
    noise = dict(unit._current_noise())
    for key in ("weight", "shared_weight"):  # kernels (.., k) -> (.., 1, k); low-rank B is already flat
        if key in noise:
            noise[key] = noise[key].unsqueeze(-2)
    pad = padding if isinstance(padding, str) else (0, padding)
    y = _conv(unit, x.unsqueeze(2), unit.weight.unsqueeze(2), noise, (1, stride), pad, (1, dilation), groups)
    return y.squeeze(2)


def _conv(unit, x, weight, noise, stride, padding, dilation, groups):
    unit._repeats(x.shape)
    b, nb, anti, mode = unit.bias, noise.get("bias"), unit.antithetic, unit.mode
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    if mode == "iid":
        return EF.perturbed_conv2d(x, weight, b, noise["weight"], nb, antithetic=anti, groups=groups, **conv)
    if mode == "lowrank":
        return EF.lowrank_conv2d(x, weight, b, noise["A"], noise["B"], nb, antithetic=anti, **conv)
    if mode == "flipout":
        args = (noise["shared_weight"], noise.get("in_sign"), noise.get("out_sign"), nb)
        return EF.flipout_conv2d(x, weight, b, *args, antithetic=anti, groups=groups, **conv)
    args = (noise["shared_weight"], noise.get("in_idx"), noise.get("out_idx"), nb)
    return EF.permuted_conv2d(x, weight, b, *args, antithetic=anti, out_inv=noise.get("out_inv"), **conv)


def unit_rows(unit: ParamUnit, idx: Tensor) -> Tensor:
    """Rows ``W[idx] + c E_k[idx]`` of a unit's ``(V, d)`` weight for a population of index tensors (Embedding).

    Args:
        unit: The unit.
        idx: ``(R * n, *)`` int64, member index fastest.

    Returns:
        ``(R * n, *, d)``.
    """
    unit._repeats(idx.shape)
    noise = unit._current_noise()
    w, anti, mode = unit.weight, unit.antithetic, unit.mode
    if mode == "lowrank":
        return EF.lowrank_embedding(idx, w, noise["A"], noise["B"], antithetic=anti)
    if mode == "flipout":
        args = (noise["shared_weight"], noise.get("in_sign"), noise.get("out_sign"))
        return EF.flipout_embedding(idx, w, *args, antithetic=anti)
    return EF.perturbed_embedding(idx, w, unit_dense(unit), antithetic=anti)


def unit_dense(unit: ParamUnit) -> Tensor:
    """Dense ``E_k`` of a unit's current members: ``(n, *weight.shape)`` (the generic path and the norms)."""
    noise = unit._current_noise()
    return noise["weight"] if unit.mode == "iid" else unit._dense_weight(noise)


# ----------------------------------------------------------------------------- hosts
class UnitHost:
    """Mixin of the module classes whose population forward reads :class:`ParamUnit` noise.

    ``perturb`` swaps a module's class for ``class Perturbed<Kind>(UnitHost, <original class>)`` and calls
    :meth:`_es_attach`; the object, its parameters, buffers and ``state_dict`` keys are unchanged.

    Attributes:
        population_dim: The input dimension that holds the population (``repeat_size * n``, member fastest):
            0, or 1 for modules of a sequence-first (``batch_first=False``) transformer layer. Recurrent and
            attention modules follow their own ``batch_first`` instead.
    """

    es_kind = "generic"
    population_dim = 0
    _es_units: list[ParamUnit]

    def _es_attach(self, units: list[ParamUnit], population_dim: int = 0) -> None:
        self._es_units = units
        self.population_dim = population_dim

    def es_units(self) -> list[ParamUnit]:
        """The units holding this module's noise (one per perturbed weight, with its bias)."""
        return list(self._es_units)

    @property
    def perturbed_flag(self) -> bool:
        """True while the population runs (set through the units by :class:`~altgrad.es_layers.PerturbedModel`)."""
        return any(u.perturbed_flag for u in self._es_units)

    def _unit(self, weight_name: str) -> ParamUnit:
        for u in self._es_units:
            if u.weight_name == weight_name:
                return u
        raise KeyError(weight_name)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        for u in self._es_units:
            u._noise = {}  # regenerated on the new device / dtype from the seed
        return out
