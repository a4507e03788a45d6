"""``perturb``: make every trainable parameter of an existing model perturbed, in place.

``nn.Linear``/``nn.Conv2d`` become the layers of :mod:`~altgrad.es_layers.linear`/:mod:`~altgrad.es_layers.conv`;
``nn.Conv1d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.MultiheadAttention``, ``nn.LSTM`` and ``nn.GRU`` keep their
object and get a batched population forward (:mod:`~altgrad.es_layers.hosts`, :mod:`~altgrad.es_layers.attention`,
:mod:`~altgrad.es_layers.recurrent`); any other module owning trainable parameters takes the generic per-member path
(:mod:`~altgrad.es_layers.generic`) unless ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from torch import nn

from .attention import PerturbedMultiheadAttention, supports_attention
from .base import Perturbed
from .conv import FlipoutConv2d, LowRankConv2d, PermutedConv2d, PerturbedConv2d
from .generic import GenericHost
from .hosts import PerturbedConv1d, PerturbedEmbedding, PerturbedLayerNorm
from .linear import FlipoutLinear, LowRankLinear, PermutedLinear, PerturbedLinear, SparsePerturbedLinear
from .model import PerturbedModel
from .recurrent import PerturbedGRU, PerturbedLSTM
from .units import MODE_OPTIONS, UnitHost, make_unit

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


def _check_shared_parameters(model: nn.Module, covered: set[int]) -> None:
    """Refuse a trainable parameter used both by a converted module and by a module left out (``include=``).

    Its perturbation would reach only the converted use, so the update would silently miss the other uses' terms.
    Parameters tied between converted modules are fine: all their uses draw the same noise.
    """
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append(
                    (f"{module_name}.{pname}" if module_name else pname, module)
                )
    for uses in owners.values():
        converted = [q for q, m in uses if id(m) in covered]
        others = [q for q, m in uses if id(m) not in covered]
        if converted and others:
            other_module = others[0].rpartition(".")[0] or "<model>"
            raise ValueError(
                f"parameter {converted[0]!r} is shared with {other_module!r} ({others[0]}), which is not "
                "converted: its perturbation would reach only one of its uses. Untie it, convert both, or exclude "
                "both with include="
            )


def _native_host(module: nn.Module) -> type[UnitHost] | None:
    """The batched host class for ``module`` (exact torch classes only), or ``None`` (generic path)."""
    t = type(module)
    if t is nn.Conv1d:
        return PerturbedConv1d
    if t is nn.Embedding and module.max_norm is None and not module.sparse:
        return PerturbedEmbedding
    if t is nn.LayerNorm:
        return PerturbedLayerNorm
    if t is nn.MultiheadAttention and supports_attention(cast(nn.MultiheadAttention, module)):
        return PerturbedMultiheadAttention
    if t is nn.LSTM:
        return PerturbedLSTM
    if t is nn.GRU:
        return PerturbedGRU
    return None


def _host_units(module: nn.Module, cls: type[UnitHost], key: str, directions: int, options: dict) -> list:
    """The units of a native host: each weight with the bias added to its product."""
    kind = cls.es_kind
    if cls is PerturbedMultiheadAttention:
        pairs = [("in_proj_weight", "in_proj_bias"), ("out_proj.weight", "out_proj.bias")]
    elif cls in (PerturbedLSTM, PerturbedGRU):
        pairs = []
        rnn = cast(nn.RNNBase, module)
        for layer in range(rnn.num_layers):
            for sfx in ("", "_reverse") if rnn.bidirectional else ("",):
                for part in ("ih", "hh"):
                    pairs.append((f"weight_{part}_l{layer}{sfx}", f"bias_{part}_l{layer}{sfx}"))
                if getattr(rnn, "proj_size", 0):  # the LSTM's projection of h (no bias)
                    pairs.append((f"weight_hr_l{layer}{sfx}", f"bias_hr_l{layer}{sfx}"))
    else:
        pairs = [("weight", "bias")]
    groups = getattr(module, "groups", 1) if cls is PerturbedConv1d else 1
    units = []
    for w, b in pairs:
        try:
            module.get_parameter(b)
        except AttributeError:  # no bias (bias=False)
            b = None  # type: ignore[assignment]
        units.append(make_unit(key, module, w, b, kind, directions, options, groups))
    return units


def _generic_units(module: nn.Module, key: str, directions: int, options: dict) -> list:
    """One unit per trainable parameter of ``module``'s subtree (each a weight of its own noise law)."""
    return [
        make_unit(key, module, name, None, "generic", directions, options)
        for name, p in module.named_parameters()
        if p.requires_grad
    ]


def _sequence_first(module: nn.Module) -> bool:
    """True for a torch transformer (layer, stack or whole) whose submodules see ``(T, B, E)`` tensors."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return _sequence_first(module.layers[0])
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    return False


def perturb(
    model: nn.Module,
    directions: int,
    mode: str = "lowrank",
    *,
    seed: int | None = None,
    include: Callable[[str, nn.Module], bool] | None = None,
    strict: bool = False,
    population_dim: int = 0,
    **options: Any,
) -> PerturbedModel:
    """Make every trainable parameter of ``model`` perturbed, in place (or refuse).

    * ``nn.Linear``/``nn.Conv2d`` are replaced by the perturbed layer of ``mode`` (same ``Parameter`` objects, so
      optimizers built before the call still work).
    * ``nn.Conv1d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.MultiheadAttention`` (so ``nn.Transformer*`` layers),
      ``nn.LSTM`` and ``nn.GRU`` keep their object, parameters and ``state_dict`` keys; their class gets a batched
      population forward. Every weight matrix (attention's packed ``in_proj_weight``, ``out_proj``, the recurrent
      ``weight_hh``) follows ``mode``; vectors (biases, LayerNorm) get IID noise.
    * Any other module owning trainable parameters (and its whole subtree) takes the generic path: per-member
      ``torch.func.functional_call``, batched with ``vmap`` where the forward allows it, else a loop.
      ``strict=True`` raises instead.

    :meth:`PerturbedModel.es_plan` lists the path, noise law and population dimension of every parameter. A module
    registered at several names is converted once (every use sees the same ``W + E_k``); a ``Parameter`` tied
    between modules (an ``nn.Embedding`` and the output ``Linear``) draws one noise per member, seen by all its
    uses, and gets one update term. Frozen parameters (``requires_grad=False``) are left alone.

    **Population dimension.** Inputs hold ``repeat_size * n`` population rows, member index fastest, on the
    batch dimension: ``population_dim`` (0) for Linear, Embedding, LayerNorm and generic modules, dim 1 for
    those inside a sequence-first (``batch_first=False``) ``nn.TransformerEncoderLayer``/``DecoderLayer``, their
    stacks and ``nn.Transformer``; recurrent
    and attention modules use their own batch dimension (dim 1 unless ``batch_first=True``) and convolutions dim 0.
    A sequence-first model (an ``nn.LSTM`` followed by a Linear head on ``(T, B, H)``) passes
    ``population_dim=1``.

    Args:
        model: The model to convert (its submodules are replaced; the model itself must not be a bare
            ``nn.Linear``/``nn.Conv2d``).
        directions: Population size.
        mode: ``"iid"`` (alias ``"perturbed"``), ``"sparse"`` (2-D weights; others IID), ``"permuted"``,
            ``"flipout"`` (aliases ``"synthetic"``, ``"signflip"``) or ``"lowrank"``.
        seed: Seed of the returned :class:`~altgrad.es_layers.PerturbedModel` (``None``: a fresh one).
        include: Optional predicate ``(qualified_name, module) -> bool`` choosing the modules to convert; the
            parameters of modules it leaves out are not perturbed (``es_plan`` says so).
        strict: Raise instead of sending a module to the generic path.
        population_dim: The batch dimension of the Linear, Embedding, LayerNorm and generic modules' inputs
            (0 or 1).
        **options: Layer options: ``antithetic``, ``noise_scale`` and the mode's own (``rank``, ``flip``,
            ``permutation``, ``in_sparsity``, ``out_sparsity``, ``sparsity``).

    Returns:
        A :class:`~altgrad.es_layers.PerturbedModel` wrapping ``model``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: For an unknown mode or option, a bare layer as ``model``, a convolution with
            ``mode="sparse"``, a model without trainable parameters, an ``include`` that selects a shared module at
            only some of its names, a parameter tied between a converted and an excluded module, a tied weight
            whose uses would draw different noise, or (``strict=True``) a module that needs the generic path.
            Nothing is changed when it raises.

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
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    if population_dim not in (0, 1) or isinstance(population_dim, bool):
        raise ValueError(f"population_dim must be 0 or 1, got {population_dim!r}")
    key = _ALIASES.get(mode, mode)
    if key not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)} (or {sorted(_ALIASES)}), got {mode!r}")
    allowed = set(MODE_OPTIONS[key]) | _COMMON_OPTIONS
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for mode {key!r}; allowed: {sorted(allowed)}")
    if type(model) in (nn.Linear, nn.Conv2d):
        raise ValueError(
            "model is a bare layer: wrap it (for example nn.Sequential(layer)) so it can be replaced"
        )
    linear_cls, conv_cls = MODES[key]
    # every name of every module (a module registered twice must be converted once, at all its names)
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module

    def chosen(module: nn.Module) -> bool:
        picks = [include is None or bool(include(n, module)) for n in names[id(module)]]
        if any(picks) and not all(picks):
            both = " and ".join(repr(n) for n in names[id(module)])
            raise ValueError(
                f"include selects the shared module {both} at some of its names only; one module object "
                "is one layer: select all its names or none"
            )
        return all(picks)

    # decide everything first (nothing is changed if a check fails)
    decisions: dict[int, tuple[str, int]] = {}  # id -> (what, population dim)

    def visit(module: nn.Module, pop_dim: int) -> None:
        if id(module) in decisions or isinstance(module, (Perturbed, UnitHost)):
            return
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        t = type(module)
        if t in (nn.Linear, nn.Conv2d) or _native_host(module) is not None:
            trainable = [p.requires_grad for p in module.parameters()]
            if any(trainable) and chosen(module):
                what = "layer" if t in (nn.Linear, nn.Conv2d) else "host"
                decisions[id(module)] = (what if all(trainable) else "generic", pop_dim)
            return
        if own:
            if chosen(module):
                inner = [n for n, m in module.named_modules() if isinstance(m, (Perturbed, UnitHost))]
                if inner:
                    raise ValueError(
                        f"module {names[id(module)][0] or '<model>'!r} ({type(module).__name__}) has parameters of its "
                        f"own and needs the generic path, but its submodule {inner[0]!r} is already perturbed: the "
                        "generic path evaluates the whole subtree member by member"
                    )
                decisions[id(module)] = ("generic", pop_dim)
            return
        if _sequence_first(module):
            pop_dim = 1
        for child in module.children():
            visit(child, pop_dim)

    visit(model, population_dim)
    if not decisions:
        raise ValueError("model has no trainable parameter to perturb (or include= selects none)")
    generic = [names[mid][0] or "<model>" for mid, (what, _) in decisions.items() if what == "generic"]
    if strict and generic:
        listed = ", ".join(
            f"{n!r} ({type(model.get_submodule(n) if n != '<model>' else model).__name__})" for n in generic
        )
        raise ValueError(
            f"strict=True: no batched path for {listed}; they would take the generic per-member path"
        )
    for mid, (what, _) in decisions.items():
        if what == "layer" and type(modules[mid]) is nn.Conv2d and conv_cls is None:
            raise ValueError(f"mode {key!r} does not support Conv2d (layer {names[mid][0]!r})")
        if what == "host" and type(modules[mid]) is nn.Conv1d and key == "sparse":
            raise ValueError(f"mode {key!r} does not support Conv1d (layer {names[mid][0]!r})")
    covered = {id(m) for mid in decisions for m in modules[mid].modules()}
    covered |= {id(m) for m in model.modules() if isinstance(m, (Perturbed, UnitHost))}
    _check_shared_parameters(model, covered)
    if type(model) is nn.Linear or (id(model) in decisions and decisions[id(model)][0] == "layer"):
        raise ValueError(
            "model is a bare layer: wrap it (for example nn.Sequential(layer)) so it can be replaced"
        )

    # build (still without changing the model), then apply
    replacements = []
    swaps: list[tuple[nn.Module, type, list, int]] = []
    unit_options = {**options}
    for mid, (what, pop_dim) in decisions.items():
        module = modules[mid]
        if what == "layer":
            cls = linear_cls if type(module) is nn.Linear else conv_cls
            new = _convert(module, cls, directions, options)  # type: ignore[arg-type]
            if pop_dim and type(module) is nn.Linear:
                setattr(new, "population_dim", pop_dim)  # noqa: B010 (a class attribute of the layer)
            replacements.append((names[mid], new, module))
        elif what == "host":
            host = _native_host(module)
            assert host is not None
            dim = 0 if host is PerturbedConv1d else pop_dim  # convolutions: always (batch, channels, ...)
            swaps.append((module, host, _host_units(module, host, key, directions, unit_options), dim))
        else:
            generic_cls = type(f"Generic{type(module).__name__}", (GenericHost, type(module)), {})
            swaps.append(
                (module, generic_cls, _generic_units(module, key, directions, unit_options), pop_dim)
            )
    classes = [(module, type(module)) for module, *_ in swaps]
    nested = [(m, m.use_nested_tensor) for m in model.modules() if isinstance(m, nn.TransformerEncoder)]

    def place(which: int) -> None:
        """Put the converted layers (``which=1``) or the original modules (``which=2``) at all their names."""
        for entry in replacements:
            for name in entry[0]:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, entry[which])

    place(1)
    for module, swapped, units, pop_dim in swaps:
        module.__class__ = swapped
        cast(UnitHost, module)._es_attach(units, pop_dim)
    for module, _ in nested:
        module.use_nested_tensor = False  # the nested-tensor fast path bypasses the perturbed submodules
    try:
        return PerturbedModel(model, directions, seed=seed)  # ties noise: refuses tied uses of different laws
    except BaseException:  # nothing changed: the original modules, classes and flags come back
        place(2)
        for module, cls in classes:
            module.__class__ = cls
            module.__dict__.pop("_es_units", None)
            module.__dict__.pop("population_dim", None)
        for module, flag in nested:
            module.use_nested_tensor = flag
        raise
