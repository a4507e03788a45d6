"""``perturb``: convert an existing model's ``nn.Linear``/``nn.Conv2d`` layers into perturbed layers in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from torch import nn

from .base import Perturbed
from .conv import FlipoutConv2d, LowRankConv2d, PermutedConv2d, PerturbedConv2d
from .linear import FlipoutLinear, LowRankLinear, PermutedLinear, PerturbedLinear, SparsePerturbedLinear
from .model import PerturbedModel

__all__ = ["MODES", "perturb"]

#: Perturbation modes accepted by :func:`perturb`, with the layer classes they use (``None``: unsupported).
MODES: dict[str, tuple[type[nn.Module], type[nn.Module] | None]] = {
    "iid": (PerturbedLinear, PerturbedConv2d),
    "sparse": (SparsePerturbedLinear, None),
    "permuted": (PermutedLinear, PermutedConv2d),
    "flipout": (FlipoutLinear, FlipoutConv2d),
    "lowrank": (LowRankLinear, LowRankConv2d),
}
_ALIASES = {"perturbed": "iid", "synthetic": "flipout", "signflip": "flipout", "sign_flip": "flipout"}
_MODE_OPTIONS = {
    "iid": set(),
    "sparse": {"sparsity"},
    "permuted": {"permutation", "in_sparsity", "out_sparsity"},
    "flipout": {"flip"},
    "lowrank": {"rank"},
}
_COMMON_OPTIONS = {"antithetic", "noise_scale", "options"}


def _convert(module: nn.Module, cls: type[nn.Module], directions: int, options: dict[str, Any]) -> nn.Module:
    """Build ``cls`` on the meta device (no RNG use, no allocation) and move the original parameters in."""
    if isinstance(module, nn.Linear):
        new = cls(
            module.in_features,
            module.out_features,
            directions,
            bias=module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
            **options,
        )
    else:
        assert isinstance(module, nn.Conv2d)
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            directions,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
            dtype=module.weight.dtype,
            **options,
        )
    # the same Parameter objects: existing optimizers keep working
    new.register_parameter("weight", cast(nn.Parameter, module.weight))
    new.register_parameter("bias", cast("nn.Parameter | None", module.bias))
    new.train(module.training)
    return new


def _check_shared_parameters(model: nn.Module, targets: set[int], names: dict[int, list[str]]) -> None:
    """Refuse a converted layer's parameter that another, unconverted module also uses.

    Its perturbation would reach only the converted use, so the update would silently miss the other uses' terms.
    Parameters tied between converted layers are fine: ``PerturbedModel`` sums their terms.
    """
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(
                    (f"{module_name}.{pname}" if module_name else pname, module)
                )
    for uses in owners.values():
        converted = [q for q, m in uses if id(m) in targets]
        others = [q for q, m in uses if id(m) not in targets and not isinstance(m, Perturbed)]
        if converted and others:
            other_module = others[0].rpartition(".")[0] or "<model>"
            raise ValueError(
                f"parameter {converted[0]!r} is shared with {other_module!r} ({others[0]}), which is not "
                "converted: its perturbation would reach only one of its uses. Untie it, convert both, or exclude "
                "the layer with include="
            )


def perturb(
    model: nn.Module,
    directions: int,
    mode: str = "lowrank",
    *,
    seed: int | None = None,
    include: Callable[[str, nn.Module], bool] | None = None,
    **options: Any,
) -> PerturbedModel:
    """Replace the ``nn.Linear`` and ``nn.Conv2d`` submodules of ``model`` by perturbed layers, in place.

    The new layers reuse the original ``Parameter`` objects (same values, same identity, so optimizers built
    before the call still work). A module registered at several names becomes one perturbed layer at all of them
    (every use sees the same ``W + E_k``); a ``Parameter`` tied across converted layers gets one independent
    perturbation per layer and the update sums their terms (see :class:`~altgrad.es_layers.PerturbedModel`). Only exact ``nn.Linear``/``nn.Conv2d`` instances are converted: subclasses (such
    as the output projection of ``nn.MultiheadAttention``, whose weight is used without calling its forward) are
    left alone, as are layers already perturbed.

    Args:
        model: The model to convert (its submodules are replaced; the model itself must not be a bare layer).
        directions: Population size.
        mode: ``"iid"`` (alias ``"perturbed"``), ``"sparse"`` (Linear only), ``"permuted"``, ``"flipout"``
            (aliases ``"synthetic"``, ``"signflip"``) or ``"lowrank"``.
        seed: Seed of the returned :class:`~altgrad.es_layers.PerturbedModel` (``None``: a fresh one).
        include: Optional predicate ``(qualified_name, module) -> bool`` choosing the layers to convert.
        **options: Layer options: ``antithetic``, ``noise_scale`` and the mode's own (``rank``, ``flip``,
            ``permutation``, ``in_sparsity``, ``out_sparsity``, ``sparsity``).

    Returns:
        A :class:`~altgrad.es_layers.PerturbedModel` wrapping ``model``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: For an unknown mode or option, a bare layer as ``model``, a layer the mode does not support
            (for example a convolution with ``mode="sparse"``), no layer to convert, an ``include`` that selects
            a shared module at only some of its names, or a converted layer's parameter that an unconverted module
            also uses (for example a tied ``nn.Embedding``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> pm = perturb(net, directions=32, mode="lowrank", rank=2, seed=0)
        >>> type(net[0]).__name__
        'LowRankLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {type(mode).__name__}")
    key = _ALIASES.get(mode, mode)
    if key not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)} (or {sorted(_ALIASES)}), got {mode!r}")
    allowed = _MODE_OPTIONS[key] | _COMMON_OPTIONS
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for mode {key!r}; allowed: {sorted(allowed)}")
    if type(model) in (nn.Linear, nn.Conv2d):
        raise ValueError(
            "model is a bare layer: wrap it (for example nn.Sequential(layer)) so it can be replaced"
        )
    linear_cls, conv_cls = MODES[key]
    # every name of every module (a module registered twice must be replaced at both places)
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    targets = []
    for mid, module in modules.items():
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        chosen = [include is None or bool(include(name, module)) for name in names[mid]]
        if any(chosen) and not all(chosen):
            both = " and ".join(repr(n) for n in names[mid])
            raise ValueError(
                f"include selects the shared module {both} at some of its names only; one module object "
                "is one layer: select all its names or none"
            )
        if all(chosen):
            targets.append(mid)
    if not targets:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to convert")
    _check_shared_parameters(model, set(targets), names)
    replacements = []
    for mid in targets:
        module = modules[mid]
        cls = linear_cls if type(module) is nn.Linear else conv_cls
        if cls is None:
            raise ValueError(
                f"mode {key!r} does not support {type(module).__name__} (layer {names[mid][0]!r})"
            )
        replacements.append((names[mid], _convert(module, cls, directions, options)))
    for all_names, new in replacements:
        for name in all_names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    return PerturbedModel(model, directions, seed=seed)
