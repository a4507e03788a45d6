"""``DNI``: wrap a whole model (every parameterised leaf) or one module with backward interfaces.

This is pytorch-dni's API implemented on :class:`~altgrad.dni.BackwardInterface`: forward hooks replace each
wrapped module's output with the interface's output; no module backward hooks are used.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._optim import (
    clear_grads,
    group_options,
    join_group,
    optimizer_factory,
    optimizer_params,
    optimizer_step,
    update,
)
from .forward import ForwardInterface
from .interface import (
    BackwardInterface,
    DeferredGradients,
    PlainState,
    abandon_warning,
    check_mode,
    next_serial,
    one_hot_labels,
    user_stacklevel,
)
from .synthesizers import LinearDNI

__all__ = ["DNI", "_DNI"]

_CONTEXT = threading.local()  # per-thread {id(DNI): context tensor}
_OWNERS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()  # module -> weakref(DNI)

# Parameter-free modules that keep the feature size, skipped when inferring a block's output features.
_SHAPE_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
)


def _infer_features(module: nn.Module, feature_dim: int) -> int | None:
    """Output features of ``module`` along ``feature_dim`` when its type tells (else ``None``)."""
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module)):
            if isinstance(child, _SHAPE_PRESERVING):
                continue
            return _infer_features(child, feature_dim)
        return None
    if feature_dim == -1:
        if isinstance(module, (nn.Linear, nn.Bilinear)):
            return module.out_features
        if isinstance(module, nn.Embedding):
            return module.embedding_dim
        if isinstance(module, nn.MultiheadAttention):
            return module.embed_dim
        if isinstance(module, nn.BatchNorm1d):
            return module.num_features
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) >= 1:
            return int(module.normalized_shape[-1])
        if isinstance(module, nn.RNNBase):
            size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
            return size * (2 if module.bidirectional else 1)
        if isinstance(module, nn.RNNCellBase):
            return module.hidden_size
    if feature_dim == 1:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return module.out_channels
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            return module.num_features
    return None


#: Modules that read their children's weights without calling them: ``recursive=True`` wraps them whole.
_WHOLE = (nn.MultiheadAttention,)


def _children(module: nn.Module) -> list[nn.Module]:
    """``module``'s children, without a parametrized module's ``parametrizations`` (its parameters' home)."""
    if parametrize.is_parametrized(module):
        return [c for n, c in module.named_children() if n != "parametrizations"]
    return list(module.children())


def _own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters ``module`` holds itself, a parametrized module's originals included."""
    own = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        lists = cast(nn.Module, module.parametrizations)
        own += [(f"parametrizations.{n}", p) for n, p in lists.named_parameters()]
    return own


def _holds_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for _, p in _own_parameters(module))


def _feature_map_dims(module: nn.Module) -> int:
    """Spatial dimensions of the convolutional ``(B, C, ...)`` feature map ``module`` produces; 0 if none."""
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module)):
            if not isinstance(child, _SHAPE_PRESERVING):
                return _feature_map_dims(child)
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        return len(module.kernel_size)
    return 2 if isinstance(module, nn.BatchNorm2d) else 3 if isinstance(module, nn.BatchNorm3d) else 0


_CONV_SYNTH = {
    1: ("Conv1dDNI", "(B, C, L)"),
    2: ("Conv2dDNI", "(B, C, H, W)"),
    3: ("Conv3dDNI", "(B, C, D, H, W)"),
}


def check_synthesizer_fits(what: str, module: nn.Module, dni_network: Any, alternative: str) -> None:
    """Raise ``ValueError`` if ``module``'s type says it produces feature maps ``dni_network`` cannot predict.

    ``what`` names the module in the message; ``alternative`` is the second way out offered there.
    """
    dims = _feature_map_dims(module)
    feature_dim = int(getattr(dni_network, "feature_dim", -1))
    synth_dims = getattr(dni_network, "dims", dims)  # a convolutional synthesizer's spatial dims
    if dims and (feature_dim != 1 or synth_dims != dims):
        synth, shape = _CONV_SYNTH[dims]
        why = (
            f"reads features along dim {feature_dim}"
            if feature_dim != 1
            else f"predicts {_CONV_SYNTH.get(synth_dims, ('', 'other'))[1]} gradients"
        )
        name = getattr(dni_network, "__name__", type(dni_network).__name__)
        raise ValueError(
            f"{what} ({type(module).__name__}) produces {shape} feature maps, but dni_network={name} {why}, so it "
            f"cannot produce their gradient; use dni_network={synth} ({alternative})"
        )


def check_feature_dim(what: str, h: Tensor, feature_dim: int, dni_network: Any) -> None:
    """Raise ``ValueError`` if ``h`` has no dimension ``feature_dim`` (where ``dni_network`` reads features)."""
    if h.dim() == 0 or not -h.dim() <= feature_dim < h.dim():
        raise ValueError(
            f"{what} produced an activation of shape {tuple(h.shape)}, which has no feature dimension "
            f"{feature_dim} for {getattr(dni_network, '__name__', type(dni_network).__name__)}"
        )


def _key(name: str) -> str:
    return name.replace(".", "/") if name else "root"


def _find(output: Any, target: Tensor) -> list[int] | None:
    """Index path of ``target`` (by identity) inside nested tuples/lists ``output``, or ``None``."""
    if output is target:
        return []
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            path = _find(item, target)
            if path is not None:
                return [i, *path]
    return None


def _replace(output: Any, path: list[int], new: Tensor, detach_rest: bool) -> Any:
    """``output`` with the element at ``path`` replaced by ``new`` (others detached if ``detach_rest``)."""
    if not path:
        return new
    items = [
        _replace(item, path[1:], new, detach_rest)
        if i == path[0]
        else (_detach_all(item) if detach_rest else item)
        for i, item in enumerate(output)
    ]
    return type(output)(items)


def _detach_all(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach_all(v) for v in value)
    return value


class DNI(PlainState):
    """Train a network (or one module) with decoupled neural interfaces and synthetic gradients.

    With ``recursive=True`` every leaf module that has trainable parameters gets a
    :class:`~altgrad.dni.BackwardInterface` on its output (a parametrized layer, such as ``weight_norm``'s, is one
    leaf); ``nn.MultiheadAttention``, which reads its ``out_proj``'s weights without calling it, is wrapped whole.
    Parameters that containers hold themselves are not stepped by the wrapper (a warning names them). The last
    wrapped module is left to the loss when ``skip_last_layer=True``: an N-layer network gets N−1 interfaces, as
    in the paper. With
    ``recursive=False`` the whole ``net`` is one block with one interface on its output; use it on single
    layers inside your own model.

    In the default ``"dni"`` mode each wrapped module receives its synthetic gradient during the forward pass
    and, with ``update_modules=True``, is stepped right then by the wrapper's optimizer: it is updated without
    waiting for the rest of the network (update unlocking). The true gradient stops at the interface, where it
    (or, with stacked interfaces, the bootstrapped gradient from the interface above) trains the synthesizer.
    Modules that are not wrapped (for example the last layer) are trained by your optimizer as usual.
    Training-time behaviour is bypassed in ``eval()`` mode.

    Synthesizers are registered under the wrapped module's name (``interfaces["layer1/0"]``, dots become
    slashes), so ``state_dict()`` keys are stable across processes. They are created at construction when the
    module type tells the activation size (Linear, Conv, BatchNorm, Embedding, RNN, LayerNorm and Sequential
    blocks ending in one), from ``sample_input`` if given, and otherwise at the first forward.

    Args:
        net: The network or module to wrap.
        hidden_size: Hidden width of each synthesizer (passed to ``dni_network``).
        dni_network: Synthesizer class, a :class:`~altgrad.dni.DNINetwork` subclass called as
            ``dni_network(input_size=..., hidden_size=..., output_size=..., **dni_params)``.
        dni_params: Extra keyword arguments for ``dni_network``.
        optim: Optimizer for the wrapped modules' parameters: an ``Optimizer`` instance (its class and
            ``defaults`` are copied), class or name. ``None`` uses ``grad_optim`` with learning rate ``lr``.
        grad_optim: Optimizer of the synthesizers (name, class or ``None`` to step them yourself via
            :meth:`synthesizer_parameters`). Names: adam, adamw, adamax, adagrad, adadelta, rmsprop, sgd.
        grad_lr: Learning rate of the synthesizers' optimizer.
        lr: Learning rate of the wrapped modules' optimizer when ``optim`` is a name, a class or ``None``;
            defaults to ``grad_lr`` (pytorch-dni's behaviour).
        recursive: Wrap every parameterised leaf and attention module (``True``) or ``net`` as a single block
            (``False``).
        skip_last_layer: With ``recursive=True``, leave the last parameterised leaf (in registration order)
            unwrapped so that the loss trains it.
        context_size: Number of context features for conditional DNI (cDNI): pass ``context=`` (one-hot or
            integer labels) to :meth:`forward` or use :meth:`context`. 0 disables conditioning.
        lam: BP(λ) mixing: wrapped modules receive ``lam·g + (1 − lam)·ŝ``; only ``lam=0`` is unlocked.
            ``lam=-1`` (pytorch-dni HEAD's meaning) sends ``g + ŝ``, the true plus the synthetic gradient.
        λ: Alias of ``lam`` (pytorch-dni's spelling).
        scale: Factor applied to synthetic gradients.
        inject: ``"immediate"`` (apply synthetic gradients at forward time) or ``"deferred"`` (during the
            backward pass; needed when a skip connection bypasses a wrapped module).
        mode: ``"dni"``, ``"observe"`` (warm-up: backprop, synthesizers still trained) or ``"backprop"``.
        warmup_steps: Number of training forward calls run in ``"observe"`` mode before ``mode`` applies.
        update_modules: Let the wrapper step the wrapped modules' parameters as soon as their gradient is
            complete. ``False`` leaves gradients in ``.grad`` for your optimizer.
        sample_input: Example input (a tensor or a tuple of positional arguments) used for a dry run in eval
            mode that creates every synthesizer at construction.
        diagnostics: Keep each interface's last prediction, target and their cosine similarity.
        modules: Names of the submodules to wrap (as in ``net.named_modules()``, any module, not only leaves);
            overrides ``recursive`` and ``skip_last_layer``. For example the hidden blocks of a model.
        format_fn: pytorch-dni's hook: ``format_fn(output)`` picks the tensor of a wrapped module's output that
            gets the interface, e.g. ``lambda out: out[0]`` for an LSTM's ``(output, (h, c))``. It must return
            one of the tensors in the output (found by identity), so that it can be replaced. ``None`` uses the
            output itself, or the first element of a tuple output.
        synthetic_inputs: Complete unlock (paper §3.3): the layers above each wrapped module run on a synthetic
            input ``ĥ = I(x [, c])`` predicted from the wrapper's first positional argument ``x`` (flattened
            to ``(B, -1)``) instead of the module's real output, which only trains ``I``
            (:class:`~altgrad.dni.ForwardInterface`); the module itself is updated from ``M(h)`` and ``M`` is
            trained on the gradient arriving at ``ĥ``. Needs ``lam=0``, ``inject="immediate"``, a feature-last
            ``dni_network`` and ``(B, features)`` activations; applies in ``"dni"`` mode (warm-up and other modes
            use the real activations). ``I`` is built at the first training forward.
        network: pytorch-dni's name for ``net`` (keyword only).
        gpu_id: pytorch-dni's device argument: ``-1`` (default) leaves devices alone; ``k >= 0`` moves the
            wrapper (network and synthesizers) to ``cuda:k``.

    A module can be driven by one wrapper at a time: wrapping modules that another live ``DNI`` wraps detaches
    that wrapper (with a warning), so re-wrapping the same network in a loop (as pytorch-dni's tests do) gives
    the newest wrapper's behaviour only.

    Raises:
        TypeError: If ``net`` is not an ``nn.Module`` or an argument has the wrong type.
        ValueError: If there is nothing to wrap (no trainable parameters) or an argument is out of range.
    """

    _STATE = frozenset({"_ready", "_active_mode", "num_steps", "_trigger", "_eval_grads", "_unseen"})

    def __init__(
        self,
        net: nn.Module | None = None,
        hidden_size: int | None = 256,
        dni_network: type[nn.Module] | None = LinearDNI,
        dni_params: Mapping[str, Any] | None = None,
        optim: Any = None,
        grad_optim: Any = "adam",
        grad_lr: float = 1e-3,
        lr: float | None = None,
        recursive: bool = True,
        skip_last_layer: bool = True,
        context_size: int = 0,
        lam: float = 0.0,
        λ: float | None = None,
        scale: float = 1.0,
        inject: str = "immediate",
        mode: str = "dni",
        warmup_steps: int = 0,
        update_modules: bool = True,
        sample_input: Any = None,
        diagnostics: bool = False,
        modules: Iterable[str] | None = None,
        format_fn: Any = None,
        gpu_id: int = -1,
        synthetic_inputs: bool = False,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if network is not None:
            if net is not None:
                raise TypeError("pass the network once: net= or its pytorch-dni alias network=, not both")
            net = network
        hidden_size = 256 if hidden_size is None else hidden_size
        dni_network = LinearDNI if dni_network is None else dni_network
        if format_fn is not None and not callable(format_fn):
            raise TypeError(f"format_fn must be callable or None, got {type(format_fn).__name__}")
        if isinstance(gpu_id, bool) or not isinstance(gpu_id, int) or gpu_id < -1:
            raise ValueError(f"gpu_id must be -1 (no move) or a CUDA device index >= 0, got {gpu_id!r}")
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise TypeError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not (isinstance(dni_network, type) and issubclass(dni_network, nn.Module)):
            raise TypeError(
                f"dni_network must be an nn.Module subclass (e.g. LinearDNI), got {dni_network!r}"
            )
        if dni_params is not None and not isinstance(dni_params, Mapping):
            raise TypeError(f"dni_params must be a mapping, got {type(dni_params).__name__}")
        if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 0:
            raise ValueError(f"context_size must be an int >= 0, got {context_size!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not isinstance(grad_lr, (int, float)) or isinstance(grad_lr, bool) or grad_lr <= 0:
            raise ValueError(f"grad_lr must be a positive float, got {grad_lr!r}")
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
            raise ValueError(f"lr must be a positive float or None, got {lr!r}")
        check_mode(mode)
        if λ is not None:
            lam = λ
        # Validate lam/scale/inject once, with the interface's own checks.
        BackwardInterface(nn.Identity(), lam=lam, scale=scale, inject=inject)
        if synthetic_inputs and (float(lam) != 0.0 or inject != "immediate"):
            raise ValueError(
                f"synthetic_inputs=True is the complete unlock: it needs lam=0 and inject='immediate', got "
                f"lam={lam}, inject={inject!r}"
            )
        if synthetic_inputs and int(getattr(dni_network, "feature_dim", -1)) != -1:
            raise ValueError(
                f"synthetic_inputs=True needs a feature-last dni_network (e.g. LinearDNI), got {dni_network.__name__}"
            )

        self.network = net
        self.interfaces = nn.ModuleDict()
        self.forward_interfaces = nn.ModuleDict()  # synthetic inputs (synthetic_inputs=True), by module key
        self.synthetic_inputs = bool(synthetic_inputs)
        self._trigger: Tensor | None = None
        self._trigger_features: dict[str, int] = {}
        self.hidden_size = hidden_size
        self.dni_network = dni_network
        self.dni_params = dict(dni_params or {})
        self.context_size = context_size
        self.lam = float(lam)
        self.scale = float(scale)
        self.inject = inject
        self.warmup_steps = warmup_steps
        self.format_fn = format_fn
        self.diagnostics_enabled = bool(diagnostics)
        self.num_steps = 0
        self._mode = mode
        self._active_mode = mode
        self._building = False
        self._features: dict[str, int] = {}
        # The interfaces by wrapped module name, with their activation sizes: the per-step look-up, a plain dict
        # (``self.interfaces`` goes through nn.Module.__getattr__ and this class's own __getattr__).
        self._by_name: dict[str, tuple[BackwardInterface, int]] = {}
        self._feature_dim = int(getattr(dni_network, "feature_dim", -1))
        self._grad_optim = optimizer_factory(grad_optim, float(grad_lr), "grad_optim")
        self._synth_optimizer: torch.optim.Optimizer | None = None
        # the names of the synthesizers _synth_optimizer steps (its checkpoint entries), in creation order
        self._synth_owners: list[str] = []
        # The synthesizers' loss gradients, collected by the interfaces as their targets arrive and back-propagated
        # together at the end of the backward pass (when the wrapper steps the synthesizers itself).
        self._deferred = DeferredGradients()
        module_optim = optim if optim is not None else grad_optim
        self._module_optim = optimizer_factory(
            module_optim, float(lr if lr is not None else grad_lr), "optim"
        )

        self._wrapped = self._select(net, recursive, skip_last_layer, modules)
        self._claim()
        self._hooks: list[Any] = []
        self._module_optimizers: list[torch.optim.Optimizer] = []
        self._module_optimizer_names: list[str] = []
        # While an interface call runs in a hook: the module optimizers whose gradients it completed (see _hook).
        self._ready: dict[int, torch.optim.Optimizer] | None = None
        self._eval_grads = False  # a backward pass in eval mode left gradients on wrapped parameters
        # The wrapped modules the first training forward has not called yet (None once it returned): a module whose
        # weights are read without calling it has an interface that trains nothing, which that forward reports.
        self._unseen: set[str] | None = None
        for name, module in self._wrapped.items():
            check_synthesizer_fits(
                f"module {name or 'net'!r}", module, dni_network, "or wrap only the linear layers"
            )
            self._hooks.append(module.register_forward_hook(functools.partial(self._hook, name)))
            features = _infer_features(module, self._feature_dim)
            if features is not None:
                self._build(name, features, module)
        if update_modules and self._module_optim is not None:
            seen: set[int] = set()
            for name, module in self._wrapped.items():
                params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
                seen.update(id(p) for p in params)
                if not params:
                    continue
                self._module_optimizers.append(self._module_optim(params))
                self._module_optimizer_names.append(name)
        self._param_hooks: list[Any] = []
        self._register_param_hooks()
        if sample_input is not None:
            self._dry_run(sample_input)
        if gpu_id >= 0:
            self.to(torch.device("cuda", gpu_id))

    def _claim(self) -> None:
        """Become the only wrapper that drives the wrapped modules (detach any other live wrapper)."""
        for module in self._wrapped.values():
            ref = _OWNERS.get(module)
            other = ref() if ref is not None else None
            if other is not None and other is not self and other._hooks:
                warnings.warn(
                    f"{type(module).__name__} modules of this network were already wrapped by another DNI; that "
                    "wrapper has been detached (its hooks removed) so that only the new one trains them",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
                other.remove()
            _OWNERS[module] = weakref.ref(self)

    def _register_param_hooks(self) -> None:
        """Step each wrapped module's optimizer when its parameters' gradients are complete.

        Tensor hooks are not carried by ``copy.deepcopy`` or pickling (a copied parameter is a new tensor), so
        :meth:`__setstate__` calls this again on the copy's own parameters and optimizers.
        """
        for opt in self._module_optimizers:
            for p in optimizer_params(opt):
                self._param_hooks.append(
                    p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, opt))
                )

    def __getstate__(self) -> dict[str, Any]:
        """State for ``copy.deepcopy`` / pickling: everything but the parameter hook handles."""
        self._deferred.flush()  # graph-connected tensors cannot be copied; their gradients can
        state = self.__dict__.copy()
        state["_param_hooks"] = []
        state["_ready"] = None
        if self._synth_optimizer is not None:
            # the synthesizers' pending update; nn.Parameter's deepcopy drops .grad, so it travels beside them
            state["_synth_grads"] = [p.grad for p in optimizer_params(self._synth_optimizer)]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy and hook it to its own parameters, so that it trains independently.

        The forward hooks live on the (copied) submodules and are bound to the copied wrapper; the optimizers
        are copied together with the parameters they hold, so they step the copy's parameters.
        """
        grads = state.pop("_synth_grads", None)
        super().__setstate__(state)
        if grads is not None and self._synth_optimizer is not None:
            for p, grad in zip(optimizer_params(self._synth_optimizer), grads, strict=True):
                p.grad = grad
        # Copies pickled by earlier versions: attributes added since, and _ready's meaning (None: not in a hook).
        self.__dict__.setdefault("_eval_grads", False)
        self.__dict__.setdefault("_unseen", None)
        self._ready = None
        if not isinstance(self.__dict__.get("_deferred"), DeferredGradients):
            self._deferred = DeferredGradients()
            for key in self.interfaces:
                if self._grad_optim is not None:
                    self._iface(key)._deferred = self._deferred
        # earlier versions: a param group per synthesizer, or no record
        if "_synth_owners" not in self.__dict__:
            names = self.__dict__.pop("_synth_groups", None)
            if names is None and self._grad_optim is not None:
                kinds = ("interfaces", "forward_interfaces")
                names = [f"{kind}.{key}" for kind in kinds for key in getattr(self, kind)]
            self._synth_owners = list(names or [])
        if "_by_name" not in self.__dict__:
            self._by_name = {
                n: (self._iface(_key(n)), self._features[_key(n)])
                for n in self._wrapped
                if _key(n) in self.interfaces
            }
        self._register_param_hooks()
        for module in self._wrapped.values():
            _OWNERS[module] = weakref.ref(self)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _select(
        net: nn.Module, recursive: bool, skip_last_layer: bool, modules: Iterable[str] | None
    ) -> dict[str, nn.Module]:
        def trainable(m: nn.Module, recurse: bool) -> bool:
            return any(p.requires_grad for p in m.parameters(recurse=recurse))

        if modules is not None:
            if isinstance(modules, str):
                raise TypeError("modules must be an iterable of module names, not a single string")
            named = dict(net.named_modules())
            chosen = {}
            for name in modules:
                if name not in named:
                    raise ValueError(f"modules: net has no submodule named {name!r}")
                if not trainable(named[name], True):
                    raise ValueError(
                        f"modules: {name!r} has no trainable parameters: there is nothing to train with DNI"
                    )
                chosen[name] = named[name]
            if not chosen:
                raise ValueError("modules is empty: nothing to wrap")
            return chosen

        if not recursive:
            if not trainable(net, True):
                raise ValueError(
                    f"net ({type(net).__name__}) has no trainable parameters: there is nothing to train with DNI"
                )
            return {"": net}
        # The parameterised leaves (a parametrized layer, weight_norm's, counts as one: its parameters live in
        # its .parametrizations), and the modules that read their children's weights without calling them, which
        # are wrapped whole (_WHOLE: nn.MultiheadAttention holds in_proj_weight and reads out_proj's weights; an
        # interface on out_proj would see no forward). named_modules() lists a parent before its children.
        leaves: dict[str, nn.Module] = {}
        unwrapped: list[str] = []  # trainable parameters that containers hold themselves
        for n, m in net.named_modules():
            parts = n.split(".")
            inside = "" in leaves or any(".".join(parts[:i]) in leaves for i in range(1, len(parts)))
            if inside or "parametrizations" in parts:
                continue
            holds = _holds_trainable(m)
            if isinstance(m, _WHOLE) or (holds and not _children(m)):
                leaves[n] = m
            elif holds:
                unwrapped += [f"{n}.{k}" if n else k for k, p in _own_parameters(m) if p.requires_grad]
        if "" in leaves:  # net itself is one layer
            unwrapped = []
        if unwrapped:
            warnings.warn(
                f"recursive=True wraps the layers; the parameters {unwrapped} belong to containers (or to the model "
                "itself), so the wrapper does not step them: they get their gradient (the synthetic gradient of the "
                "interface above them, or the loss's) in .grad for your optimizer, as the unwrapped last layer does. "
                "To have them stepped at once, wrap their module with modules=[...]",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        if not leaves:
            raise ValueError(
                f"net ({type(net).__name__}) has no leaf module with trainable parameters: nothing to wrap"
            )
        if skip_last_layer:
            leaves.pop(list(leaves)[-1])
            if not leaves:
                raise ValueError(
                    "net has a single parameterised leaf module and skip_last_layer=True leaves it to the loss: "
                    "nothing to wrap (pass skip_last_layer=False or recursive=False)"
                )
        return leaves

    def _synthesizer(self, input_size: int, features: int, module: nn.Module, group: str) -> nn.Module:
        synth = self.dni_network(
            input_size=input_size,
            hidden_size=self.hidden_size,
            output_size=features,
            **self.dni_params,
        )
        ref = next((p for p in module.parameters() if p.is_floating_point()), None)
        if ref is not None:
            synth = synth.to(device=ref.device, dtype=ref.dtype)
        params = [p for p in synth.parameters() if p.requires_grad]
        if self._grad_optim is not None and params:
            # One optimizer for all synthesizers, stepped before the next prediction (see step_synthesizers).
            if self._synth_optimizer is None:
                self._synth_optimizer = self._grad_optim(params)
            else:
                join_group(self._synth_optimizer, params)
            self._synth_owners.append(group)
        return synth

    def _build_forward(self, name: str, trigger_features: int, module: nn.Module) -> ForwardInterface:
        key = _key(name)
        features = self._features[key]
        synth = self._synthesizer(
            trigger_features + self.context_size, features, module, f"forward_interfaces.{key}"
        )
        self._trigger_features[key] = trigger_features
        self.forward_interfaces[key] = ForwardInterface(synth, context_size=self.context_size)
        return cast(ForwardInterface, self.forward_interfaces[key])

    def _build(self, name: str, features: int, module: nn.Module) -> BackwardInterface:
        synth = self._synthesizer(features + self.context_size, features, module, f"interfaces.{_key(name)}")
        iface = BackwardInterface(
            synth,
            context_size=self.context_size,
            lam=self.lam,
            scale=self.scale,
            inject=self.inject,
            mode=self._mode,
            feature_dim=self._feature_dim,
            diagnostics=self.diagnostics_enabled,
        )
        if self._grad_optim is not None:
            iface._deferred = self._deferred
        self._features[_key(name)] = features
        self.interfaces[_key(name)] = iface
        self._by_name[name] = (iface, features)
        return iface

    def _dry_run(self, sample_input: Any) -> None:
        args = sample_input if isinstance(sample_input, tuple) else (sample_input,)
        was_training = self.network.training
        self._building = True
        try:
            self.network.eval()
            with torch.no_grad():
                self.network(*args)
        finally:
            self._building = False
            self.network.train(was_training)

    # ------------------------------------------------------------------ the hook
    # torch.compile: the hook and forward run eagerly (a graph break), because they step optimizers, call
    # autograd.backward and keep Python state across the forward and backward passes. The hook checks for
    # tracing itself rather than through torch.compiler.disable's wrapper, which costs more than the check on
    # every call of every wrapped module.
    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> Any:
        if torch.compiler.is_compiling():
            return self._hook_eager(name, module, args, output)
        return self._run_hook(name, module, output)

    @torch.compiler.disable
    def _hook_eager(self, name: str, module: nn.Module, args: Any, output: Any) -> Any:
        return self._run_hook(name, module, output)

    def _run_hook(self, name: str, module: nn.Module, output: Any) -> Any:
        if self._unseen is not None:
            self._unseen.discard(name)
        building = self._building
        if not (self.training or building) or (self._active_mode == "backprop" and not building):
            return None
        rest: Any = None
        path: list[int] | None = None
        if isinstance(output, Tensor) and self.format_fn is None:
            h = output
        else:
            h, rest, path = self._select_output(name, module, output)
        if not h.is_floating_point():
            return None
        iface = self._interface_for(name, module, h)
        if building or not h.requires_grad:
            return None
        if iface._mode != self._active_mode:
            iface.mode = self._active_mode
        # During the interface call (which back-propagates the synthetic gradient at once in the unlocked
        # mode) parameter hooks only collect the optimizers to step; each is then stepped once.
        self._ready = {}
        try:
            if self.synthetic_inputs and iface.unlocked and self._trigger is not None:
                out = self._complete_unlock(name, module, iface, h)
            else:
                out = iface._forward(h, self._current_context())  # eager already: no torch.compile guard
        finally:
            ready, self._ready = self._ready, None
            if ready:
                for opt in ready.values():
                    update(opt)
        if path:
            return _replace(output, path, out, iface.unlocked)
        if rest is None:
            return out
        if iface.unlocked:
            rest = _detach_all(rest)  # the module is cut off: only the synthetic gradient trains it
        return type(output)((out, *rest))

    def _select_output(
        self, name: str, module: nn.Module, output: Any
    ) -> tuple[Tensor, Any, list[int] | None]:
        """``(h, rest, path)``: the tensor of ``output`` that gets the interface (``format_fn`` or the first)."""
        if self.format_fn is not None:
            h = self.format_fn(output)
            path = _find(output, h) if isinstance(h, Tensor) else None
            if path is None:
                raise ValueError(
                    f"format_fn must return one of the tensors in the output of DNI-wrapped module "
                    f"{name or type(module).__name__!r} (for example lambda out: out[0]), got "
                    f"{'a new tensor' if isinstance(h, Tensor) else type(h).__name__}: its gradient could not be routed"
                )
            return (h if path else output), None, path
        if isinstance(output, Tensor):
            return output, None, None
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return output[0], output[1:], None
        raise TypeError(
            f"DNI-wrapped module {name or type(module).__name__!r} returned {type(output).__name__}; expected a "
            "Tensor or a tuple whose first element is a Tensor"
        )

    def _complete_unlock(self, name: str, module: nn.Module, iface: BackwardInterface, h: Tensor) -> Tensor:
        """Synthetic gradient into ``module`` now; the layers above get the synthetic input, tapped for ``M``."""
        trigger = cast(Tensor, self._trigger)
        if h.dim() != 2:
            raise ValueError(
                f"synthetic_inputs=True needs (B, features) activations; module {name or 'net'!r} produced shape "
                f"{tuple(h.shape)}"
            )
        key = _key(name)
        fwd = (
            cast(ForwardInterface, self.forward_interfaces[key])
            if key in self.forward_interfaces
            else self._build_forward(name, trigger.shape[1], module)
        )
        context = self._current_context()
        synthetic = fwd(h, trigger.to(h.dtype), context)
        torch.autograd.backward(iface.inject(h, context=context))
        return iface.trigger(synthetic, context=context)

    def _interface_for(self, name: str, module: nn.Module, h: Tensor) -> BackwardInterface:
        fd = self._feature_dim
        check_feature_dim(f"module {name or 'net'!r}", h, fd, self.dni_network)
        entry = self._by_name.get(name)
        iface, expected = (
            entry if entry is not None else (self._build(name, h.shape[fd], module), h.shape[fd])
        )
        if h.shape[fd] != expected:
            # a hint for (B, C, ...) feature maps; a (B, T, F) sequence is not one
            synth = _CONV_SYNTH.get(h.dim() - 2) if fd == -1 and h.dim() >= 4 else None
            hint = f" (use {synth[0]} for {synth[1]} feature maps)" if synth else ""
            raise ValueError(
                f"module {name or 'net'!r} produced an activation of shape {tuple(h.shape)}; "
                f"{self.dni_network.__name__} reads features along dim {fd} (size {h.shape[fd]}) but was built for "
                f"{expected} features, so it cannot produce this activation's gradient{hint}"
            )
        return iface

    def _iface(self, key: str) -> BackwardInterface:
        return cast(BackwardInterface, self.interfaces[key])

    def _on_grad(self, optimizer: torch.optim.Optimizer, param: Tensor) -> None:
        """Post-accumulate-grad hook of a wrapped parameter: step its module's optimizer.

        Only in training mode: in ``eval()`` mode gradients accumulate in ``.grad`` as in plain autograd
        (saliency maps, adversarial examples and gradient checks must not train the model).
        """
        ready = self._ready
        if ready is not None:  # inside a training forward's interface call (see _hook)
            ready[id(optimizer)] = optimizer
            return
        if not self.training:
            self._eval_grads = True  # dropped at the next training forward
            return
        optimizer_step(optimizer)
        param.grad = None

    def _current_context(self) -> Tensor | None:
        return getattr(_CONTEXT, "values", {}).get(id(self))

    # ------------------------------------------------------------------ public API
    @property
    def mode(self) -> str:
        """The configured mode: ``"dni"``, ``"observe"`` or ``"backprop"`` (``warmup_steps`` may override)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = self._active_mode = check_mode(value)

    @contextlib.contextmanager
    def context(self, context: Tensor | None) -> Iterator[None]:
        """Condition the synthesizers on ``context`` (cDNI) for the forward calls inside the ``with`` block.

        Args:
            context: ``(B, context_size)`` features (typically one-hot labels) or ``(B,)`` integer labels.

        Yields:
            Nothing; the context applies to this wrapper in the current thread.
        """
        previous = self._push_context(context)
        try:
            yield
        finally:
            self._pop_context(previous)

    def _push_context(self, context: Tensor | None) -> Tensor | None:
        """Make ``context`` this wrapper's context in this thread; returns the one it replaces."""
        values = _CONTEXT.__dict__.setdefault("values", {})
        previous = values.get(id(self))
        values[id(self)] = self._one_hot(context)
        return previous

    def _pop_context(self, previous: Tensor | None) -> None:
        values = _CONTEXT.__dict__["values"]
        if previous is None:
            values.pop(id(self), None)
        else:
            values[id(self)] = previous

    def _one_hot(self, context: Tensor | None) -> Tensor | None:
        """Encode integer labels once per forward (interfaces would otherwise each do it)."""
        if isinstance(context, Tensor) and not context.is_floating_point() and self.context_size:
            return one_hot_labels(context, self.context_size)
        return context

    @torch.compiler.disable
    def forward(self, *args: Any, context: Tensor | None = None, **kwargs: Any) -> Any:
        """Run the wrapped network.

        Under ``torch.compile`` this method runs eagerly (``torch.compiler.disable``): compiling a wrapped
        model, or a model that contains wrappers, trains exactly as in eager mode; the wrapped network itself
        is not compiled.

        Args:
            *args: Positional arguments of the wrapped network.
            context: Optional cDNI context (one-hot ``(B, context_size)`` or integer ``(B,)`` labels); the
                keyword is consumed by the wrapper.
            **kwargs: Keyword arguments of the wrapped network.

        Returns:
            The wrapped network's output.
        """
        if self.training:
            if self.synthetic_inputs:
                x = args[0] if args else None
                if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
                    raise TypeError(
                        "synthetic_inputs=True predicts activations from the first positional argument, which must "
                        f"be a floating-point tensor with a batch dimension, got {type(x).__name__}"
                    )
            self._active_mode = "observe" if self.num_steps < self.warmup_steps else self._mode
            self.num_steps += 1
            self.step_synthesizers()
            # The wrapper owns the wrapped modules' updates and consumes their gradients as it steps, so a
            # gradient can only be left by a backward pass in eval mode (a saliency map, say; _on_grad notes
            # it): drop it, or it would leak into this training step. Checked by flag, not by a zero_grad of
            # every module optimizer on every step.
            if self._eval_grads:
                for opt in self._module_optimizers:
                    clear_grads(opt)
                self._eval_grads = False
            if self.synthetic_inputs:
                self._trigger = args[0].detach().reshape(args[0].shape[0], -1)
            if self.num_steps == 1:
                self._unseen = set(self._wrapped)
        since = next_serial()
        network = cast(nn.Module, self._modules["network"])  # not through __getattr__: this runs every step
        previous, pushed = None, False
        # Targets that arrive during this forward (the synthetic gradients the interfaces back-propagate at once)
        # are collected and their synthesizers' losses back-propagated together when it returns.
        deferred = self._deferred
        holding, deferred.holding = deferred.holding, True
        try:
            if context is not None:
                previous, pushed = self._push_context(context), True
            out = network(*args, **kwargs)
        except BaseException:
            # A failed forward (an exception, Ctrl-C) returns no output, so no backward pass can reach its
            # predictions; its traceback may keep their graph alive. Stop waiting for them now, and do not count
            # the step (warm-up). Modules it already stepped with their synthetic gradient keep that step.
            for iface, _ in self._by_name.values():
                iface.abandon_pending(since)
            if self.training:
                self.num_steps -= 1
            self._unseen = None
            raise
        finally:
            deferred.holding = holding
            self._trigger = None
            if pushed:
                self._pop_context(previous)
        if not holding:
            deferred.flush()
        if self._unseen is not None:
            unseen, self._unseen = self._unseen, None
            if unseen:
                warnings.warn(
                    f"the wrapped modules {sorted(unseen)} were not called in the first training forward, so their "
                    "interfaces trained nothing in it (a module whose weights another module reads without calling "
                    "it, as nn.MultiheadAttention reads its out_proj, never gets its interface; a branch not taken "
                    "does when it runs); wrap the module that calls them (modules=[...])",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
        return out

    def synthesizer_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of all synthesizers (separate from the model's).

        Yields:
            Each synthesizer parameter.

        Raises:
            RuntimeError: If some synthesizer has not been created yet (pass ``sample_input=`` or run a forward).
        """
        missing = [n or "net" for n in self._wrapped if _key(n) not in self.interfaces]
        if missing:
            raise RuntimeError(
                f"synthesizers for {missing} are created at the first forward because their activation size "
                "cannot be inferred; pass sample_input= to DNI or run one forward first"
            )
        for key in self.interfaces:
            yield from self._iface(key).synthesizer.parameters()
        for fwd in self.forward_interfaces.values():
            yield from cast(ForwardInterface, fwd).synthesizer.parameters()

    def model_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the wrapped network (without the synthesizers).

        Yields:
            Each parameter of ``net``.
        """
        yield from self.network.parameters()

    def wrapped_modules(self) -> dict[str, nn.Module]:
        """The modules that carry an interface, by name (``""`` for ``net`` itself)."""
        return dict(self._wrapped)

    def interface(self, name: str) -> BackwardInterface:
        """The interface on the wrapped module called ``name`` (as in ``net.named_modules()``).

        Args:
            name: Module name, for example ``"layer1.0"``; ``""`` when ``recursive=False``.

        Returns:
            The :class:`~altgrad.dni.BackwardInterface`.
        """
        if name not in self._wrapped:
            raise KeyError(f"no wrapped module named {name!r}; wrapped: {sorted(self._wrapped)}")
        key = _key(name)
        if key not in self.interfaces:
            raise RuntimeError(f"the synthesizer for {name!r} is created at the first forward")
        return self._iface(key)

    def step_synthesizers(self) -> None:
        """Apply the synthesizer updates whose targets have arrived.

        Called automatically at the start of every training forward and by :meth:`state_dict`; a synthesizer's
        update is therefore always applied before its next prediction, which is what stepping it the moment
        its target arrives would give, with one optimizer step for all synthesizers. Held back while some
        prediction still waits for its target (for example between two forwards accumulated into one
        backward), because its graph still needs the current weights. A prediction still waiting when the
        target of a later prediction of the same interface has arrived belongs to an abandoned forward (its graph
        is kept alive elsewhere, say by a traceback in ``sys.last_traceback``): it is abandoned with a
        ``RuntimeWarning`` and counted in :meth:`diagnostics`, and no longer holds the update back. (A forward
        that raises abandons its own predictions at once.)
        """
        ifaces = [iface for iface, _ in self._by_name.values()]
        if any(iface._records for iface in ifaces):  # some prediction is pending: any stale among them?
            abandon_warning(sum(iface._abandon_stale() for iface in ifaces))
        self._deferred.flush()
        opt = self._synth_optimizer
        if opt is None or any(iface._pending for iface in ifaces):
            return
        if any(p.grad is not None for p in optimizer_params(opt)):
            update(opt)

    def step_optimizers(self) -> None:
        """pytorch-dni HEAD's name: apply every pending update now (call it after ``loss.backward()``).

        The wrapped modules are already stepped when their gradients are complete, so this applies the
        synthesizers' pending update (:meth:`step_synthesizers`), which otherwise happens at the next training
        forward. Calling it twice, or without a backward pass in between, changes nothing.
        """
        self.step_synthesizers()

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Last synthesizer loss (and cosine to the target, with ``diagnostics=True``) per wrapped module.

        Returns:
            ``{module_name: {"loss": ..., "cosine": ..., "abandoned": ...}}`` for interfaces that have seen a
            target or abandoned a prediction; ``"abandoned"`` (present when nonzero) counts the predictions
            whose target never arrived (see :meth:`step_synthesizers`).
        """
        out: dict[str, dict[str, float]] = {}
        for name in self._wrapped:
            if _key(name) not in self.interfaces:
                continue
            iface = self._iface(_key(name))
            entry: dict[str, float] = {}
            if iface.last_loss is not None:
                entry["loss"] = float(iface.last_loss)
            if iface.last_cosine is not None:
                entry["cosine"] = float(iface.last_cosine)
            if iface.abandoned:
                entry["abandoned"] = iface.abandoned
            if entry:
                out[name] = entry
        return out

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers the wrapper steps for the wrapped modules, by module name (as in ``named_modules()``).

        One per wrapped module that has trainable parameters of its own (empty with ``update_modules=False``).
        Their state is part of :meth:`state_dict`. Change learning rates through their ``param_groups``.
        """
        return dict(zip(self._module_optimizer_names, self._module_optimizers, strict=True))

    @property
    def grad_optimizer(self) -> torch.optim.Optimizer | None:
        """The synthesizers' optimizer (one for all synthesizers, ``grad_optim``), or ``None``.

        ``None`` with ``grad_optim=None`` or before the first synthesizer exists. Its state is part of
        :meth:`state_dict`.
        """
        return self._synth_optimizer

    def remove(self) -> nn.Module:
        """Remove all hooks and return the bare network.

        Returns:
            The wrapped network, no longer trained by this wrapper.
        """
        for handle in (*self._hooks, *self._param_hooks):
            handle.remove()
        self._hooks.clear()
        self._param_hooks.clear()
        self._module_optimizers.clear()
        self._module_optimizer_names.clear()
        return self.network

    # ------------------------------------------------------------------ state
    def _synth_slices(self, groups: list[dict[str, Any]]) -> Iterator[tuple[str, int, list[Any]]]:
        """``(synthesizer name, group index, its parameters' ids)`` over a ``state_dict()``'s param groups.

        Found by the parameters themselves, not by their order, so a group a user added to the optimizer (or
        parameters appended to one) cannot shift a synthesizer onto another's state.
        """
        assert self._synth_optimizer is not None
        flat = [(g, i) for g, group in enumerate(groups) for i in group["params"]]
        where = {id(p): flat[k] for k, p in enumerate(optimizer_params(self._synth_optimizer))}
        for name in self._synth_owners:
            synth = cast(nn.Module, self.get_submodule(name)._modules["synthesizer"])
            part = [where[id(p)] for p in synth.parameters() if p.requires_grad and id(p) in where]
            if part:
                yield name, part[0][0], [i for _, i in part]

    def get_extra_state(self) -> dict[str, Any]:
        """Everything besides the weights that determines the next step, keyed by name.

        The step counter, the per-interface activation sizes (a fresh wrapper rebuilds lazy synthesizers from
        them), the state of the wrapped modules' optimizers (by module name) and of the synthesizers' optimizer
        (by synthesizer), and recurrent synthesizers' hidden state. Only tensors and plain Python values, so
        ``torch.load(..., weights_only=True)`` reads it. Pending synthesizer updates are applied first, so a
        checkpoint holds the up-to-date synthesizers.
        """
        self.step_synthesizers()
        synth = None
        if self._synth_optimizer is not None:
            sd = self._synth_optimizer.state_dict()
            synth = {
                name: {
                    "options": group_options(sd["param_groups"][g]),
                    "state": [sd["state"].get(i) for i in ids],
                }
                for name, g, ids in self._synth_slices(sd["param_groups"])
            }
        hidden = {
            key: self._iface(key)._hidden for key in self.interfaces if self._iface(key)._hidden is not None
        }
        return {
            "version": 2,
            "num_steps": self.num_steps,
            "features": dict(self._features),
            "trigger_features": dict(self._trigger_features),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "grad_optimizer": synth,
            "hidden": hidden,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state`'s data, creating synthesizers that do not exist yet.

        Version 1 states (written before optimizer state was checkpointed) restore the step counter and the
        synthesizers; the optimizers keep their current state, with a warning (``load_state_dict`` accepts
        them only with ``strict=False``).

        Args:
            state: The dictionary saved by :meth:`get_extra_state`.

        Raises:
            ValueError: If the state is not a DNI state or its optimizers do not match this wrapper's.
        """
        if not isinstance(state, dict) or state.get("version") not in (1, 2):
            raise ValueError(f"unrecognised DNI extra state: {state!r}")
        if state["version"] == 2:
            self._check_optimizer_names(state)
        # The optimizer states are loaded into the optimizers as they are (torch's Optimizer.load_state_dict keeps
        # the tensors): a copy, so that this wrapper does not share its moments with the one that saved them (or
        # with another wrapper loading the same dict), as nn.Module.load_state_dict copies the weights.
        state = {
            **state,
            "optimizers": copy.deepcopy(state.get("optimizers")),
            "grad_optimizer": copy.deepcopy(state.get("grad_optimizer")),
        }
        # The update this wrapper's own last backward left pending belongs to the state being replaced: drop it.
        self._deferred.clear()
        if self._synth_optimizer is not None:
            clear_grads(self._synth_optimizer)
        self.num_steps = int(state["num_steps"])
        for name, module in self._wrapped.items():
            key = _key(name)
            if key not in self.interfaces and key in state["features"]:
                self._build(name, int(state["features"][key]), module)
            trigger_features = state.get("trigger_features", {})
            if key not in self.forward_interfaces and key in trigger_features:
                self._build_forward(name, int(trigger_features[key]), module)
        if state["version"] == 1:
            warnings.warn(
                "this DNI checkpoint (state version 1) holds no optimizer state: the wrapper's optimizers keep "
                "their current state, so training does not continue exactly as before the checkpoint",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return
        optimizers = self.optimizers
        for name, saved in state["optimizers"].items():
            optimizers[name].load_state_dict(saved)
        if self._synth_optimizer is not None and state["grad_optimizer"] is not None:
            current = self._synth_optimizer.state_dict()
            groups = [dict(group) for group in current["param_groups"]]
            # a synthesizer the checkpoint did not have yet keeps its fresh state
            values = dict(current["state"])
            # a group's options (learning rate...) come from its first saved synthesizer
            options_from: dict[int, str] = {}
            for name, g, ids in self._synth_slices(current["param_groups"]):
                saved = state["grad_optimizer"].get(name)
                if saved is None:
                    continue
                if g not in options_from:
                    options_from[g] = name
                    groups[g] = {**saved["options"], "params": groups[g]["params"]}
                elif saved["options"] != group_options(groups[g]):
                    warnings.warn(
                        f"the checkpoint's synthesizers {options_from[g]!r} and {name!r} have different optimizer "
                        f"options (one parameter group each, as saved by an earlier version); they share one group "
                        f"here and get {options_from[g]!r}'s",
                        UserWarning,
                        stacklevel=user_stacklevel(),
                    )
                for i, v in zip(ids, saved["state"], strict=True):
                    if v is None:
                        values.pop(i, None)
                    else:
                        values[i] = v
            self._synth_optimizer.load_state_dict({"state": values, "param_groups": groups})
        for key, hidden in state["hidden"].items():
            self._iface(key)._hidden = hidden

    def _check_optimizer_names(self, state: dict[str, Any]) -> None:
        """Raise before anything is restored if ``state``'s optimizers do not fit this wrapper."""
        names = set(self._module_optimizer_names)
        if set(state["optimizers"]) != names:
            raise ValueError(
                f"the checkpoint has module optimizers for {sorted(state['optimizers'])} but this DNI steps "
                f"{sorted(names)}: it was saved from a wrapper with other modules or update_modules setting"
            )
        synth = state["grad_optimizer"] or {}
        known = {f"interfaces.{k}" for k in state["features"]} | set(self._synth_owners)
        known |= {f"forward_interfaces.{k}" for k in state.get("trigger_features", {})}
        unknown = sorted(set(synth) - known)
        if unknown or (synth and self._grad_optim is None):
            raise ValueError(
                f"the checkpoint has synthesizer optimizer state for {unknown or sorted(synth)} that this DNI "
                "cannot hold (other wrapped modules, or grad_optim=None)"
            )
        bad = sorted(set(state["hidden"]) - set(state["features"]))
        if bad:
            raise ValueError(f"the checkpoint has synthesizer hidden state for unknown interfaces {bad}")

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``, refusing by default a checkpoint that holds no optimizer state.

        Checkpoints written before the optimizers' state was part of the wrapper's state (DNI state version 1)
        load only with ``strict=False``; the optimizers then keep their current state (with a warning).
        A checkpoint whose optimizers do not fit this wrapper raises ``ValueError`` before anything is loaded.
        """
        extra = state_dict.get("_extra_state")
        if strict and isinstance(extra, dict) and extra.get("version") == 1:
            raise RuntimeError(
                "this DNI checkpoint (state version 1) holds no optimizer state, so training would not continue "
                "as before it; load it with load_state_dict(..., strict=False) to accept that (the optimizers "
                "then keep their current state)"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            network = self.__dict__.get("_modules", {}).get("network")
            if network is None or name.startswith("_"):
                raise
            try:
                return getattr(network, name)
            except AttributeError:
                raise AttributeError(
                    f"'DNI' object (wrapping {type(network).__name__}) has no attribute {name!r}, and neither has "
                    "the wrapped network"
                ) from None


class _DNI(DNI):
    """pytorch-dni's ``_DNI`` (its ``dni/dni_monkeypatch.py`` variant), with that class's constructor.

    pytorch-dni exports it and its tasks import it (``from dni import _DNI`` in ``tasks/mnist/fcn.py``,
    ``tasks/cifar10/fcn.py`` and ``tasks/copy_task.py``). It is the same wrapper as :class:`DNI` with
    ``recursive=True, skip_last_layer=True``: every parameterised leaf but the last gets an interface and is
    stepped from its synthetic gradient during the forward pass. The arguments keep ``_DNI``'s order and
    defaults (``hidden_size=None`` means 10, ``λ=0.5``); ``decouple_forwards`` (synthetic inputs, which
    pytorch-dni left unfinished) is :class:`DNI`'s ``synthetic_inputs`` and so needs ``λ=0``.
    :meth:`optimize` is ``_DNI``'s name for applying the synthesizers' update.

    Args:
        network: The network to wrap.
        dni_network: Synthesizer class (default :class:`~altgrad.dni.LinearDNI`).
        optim: Optimizer (instance, class or name) for the wrapped modules; ``None`` uses ``grad_optim``.
        grad_optim: Optimizer of the synthesizers (and of the modules when ``optim`` is ``None``).
        grad_lr: Its learning rate.
        hidden_size: Hidden width of each synthesizer; ``None`` is 10, as in pytorch-dni's ``_DNI``.
        λ: BP(λ) mixing, as :class:`DNI`'s ``lam``.
        gpu_id: ``-1`` leaves devices alone; ``k >= 0`` moves the wrapper to ``cuda:k``.
        decouple_forwards: Synthetic inputs (:class:`DNI`'s ``synthetic_inputs``).
    """

    def __init__(
        self,
        network: nn.Module,
        dni_network: type[nn.Module] | None = None,
        optim: Any = None,
        grad_optim: Any = "adam",
        grad_lr: float = 0.001,
        hidden_size: int | None = None,
        λ: float = 0.5,
        gpu_id: int = -1,
        decouple_forwards: bool = False,
    ) -> None:
        super().__init__(
            network,
            hidden_size=10 if hidden_size is None else hidden_size,
            dni_network=dni_network,
            optim=optim,
            grad_optim=grad_optim,
            grad_lr=grad_lr,
            λ=λ,
            gpu_id=gpu_id,
            synthetic_inputs=decouple_forwards,
        )

    def optimize(self) -> None:
        """``_DNI``'s name for :meth:`DNI.step_optimizers`: apply the synthesizers' pending update now."""
        self.step_optimizers()
