"""``DNI``: wrap a whole model (every parameterised leaf) or one module with backward interfaces.

This is pytorch-dni's API implemented on :class:`~altgrad.dni.BackwardInterface`: forward hooks replace each
wrapped module's output with the interface's output; no module backward hooks are used.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._optim import optimizer_factory
from .interface import MODES, BackwardInterface
from .synthesizers import LinearDNI

__all__ = ["DNI"]

_CONTEXT = threading.local()  # per-thread {id(DNI): context tensor}

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


def _key(name: str) -> str:
    return name.replace(".", "/") if name else "root"


def _detach_all(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach_all(v) for v in value)
    return value


class DNI(nn.Module):
    """Train a network (or one module) with decoupled neural interfaces and synthetic gradients.

    With ``recursive=True`` every leaf module that has trainable parameters gets a
    :class:`~altgrad.dni.BackwardInterface` on its output (the last such leaf is left to the loss when
    ``skip_last_layer=True``: an N-layer network gets N−1 interfaces, as in the paper). With
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
        recursive: Wrap every parameterised leaf (``True``) or ``net`` as a single block (``False``).
        skip_last_layer: With ``recursive=True``, leave the last parameterised leaf (in registration order)
            unwrapped so that the loss trains it.
        context_size: Number of context features for conditional DNI (cDNI): pass ``context=`` (one-hot or
            integer labels) to :meth:`forward` or use :meth:`context`. 0 disables conditioning.
        lam: BP(λ) mixing: wrapped modules receive ``lam·g + (1 − lam)·ŝ``; only ``lam=0`` is unlocked.
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

    Raises:
        TypeError: If ``net`` is not an ``nn.Module`` or an argument has the wrong type.
        ValueError: If there is nothing to wrap (no trainable parameters) or an argument is out of range.
    """

    def __init__(
        self,
        net: nn.Module,
        hidden_size: int = 256,
        dni_network: type[nn.Module] = LinearDNI,
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
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise TypeError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not (isinstance(dni_network, type) and issubclass(dni_network, nn.Module)):
            raise TypeError(f"dni_network must be an nn.Module subclass (e.g. LinearDNI), got {dni_network!r}")
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
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if λ is not None:
            lam = λ
        # Validate lam/scale/inject once, with the interface's own checks.
        BackwardInterface(nn.Identity(), lam=lam, scale=scale, inject=inject)

        self.network = net
        self.interfaces = nn.ModuleDict()
        self.hidden_size = hidden_size
        self.dni_network = dni_network
        self.dni_params = dict(dni_params or {})
        self.context_size = context_size
        self.lam = float(lam)
        self.scale = float(scale)
        self.inject = inject
        self.warmup_steps = warmup_steps
        self.diagnostics_enabled = bool(diagnostics)
        self.num_steps = 0
        self._mode = mode
        self._active_mode = mode
        self._building = False
        self._features: dict[str, int] = {}
        self._feature_dim = int(getattr(dni_network, "feature_dim", -1))
        self._grad_optim = optimizer_factory(grad_optim, float(grad_lr), "grad_optim")
        module_optim = optim if optim is not None else grad_optim
        self._module_optim = optimizer_factory(module_optim, float(lr if lr is not None else grad_lr), "optim")

        self._wrapped = self._select(net, recursive, skip_last_layer)
        self._hooks: list[Any] = []
        self._param_optimizers: dict[int, torch.optim.Optimizer] = {}
        for name, module in self._wrapped.items():
            self._hooks.append(module.register_forward_hook(functools.partial(self._hook, name)))
            features = _infer_features(module, self._feature_dim)
            if features is not None:
                self._build(name, features, module)
        if update_modules and self._module_optim is not None:
            for module in self._wrapped.values():
                for p in module.parameters():
                    if p.requires_grad and id(p) not in self._param_optimizers:
                        opt = self._module_optim([p])
                        self._param_optimizers[id(p)] = opt
                        self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_step_param, opt)))
        if sample_input is not None:
            self._dry_run(sample_input)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _select(net: nn.Module, recursive: bool, skip_last_layer: bool) -> dict[str, nn.Module]:
        def trainable(m: nn.Module, recurse: bool) -> bool:
            return any(p.requires_grad for p in m.parameters(recurse=recurse))

        if not recursive:
            if not trainable(net, True):
                raise ValueError(f"net ({type(net).__name__}) has no trainable parameters: there is nothing to train with DNI")
            return {"": net}
        leaves = {n: m for n, m in net.named_modules() if not any(True for _ in m.children()) and trainable(m, False)}
        if not leaves:
            raise ValueError(f"net ({type(net).__name__}) has no leaf module with trainable parameters: nothing to wrap")
        if skip_last_layer:
            leaves.pop(list(leaves)[-1])
            if not leaves:
                raise ValueError(
                    "net has a single parameterised leaf module and skip_last_layer=True leaves it to the loss: "
                    "nothing to wrap (pass skip_last_layer=False or recursive=False)"
                )
        return leaves

    def _build(self, name: str, features: int, module: nn.Module) -> BackwardInterface:
        synth = self.dni_network(
            input_size=features + self.context_size,
            hidden_size=self.hidden_size,
            output_size=features,
            **self.dni_params,
        )
        ref = next((p for p in module.parameters() if p.is_floating_point()), None)
        if ref is not None:
            synth = synth.to(device=ref.device, dtype=ref.dtype)
        params = [p for p in synth.parameters() if p.requires_grad]
        optimizer = self._grad_optim(params) if self._grad_optim is not None and params else None
        iface = BackwardInterface(
            synth,
            context_size=self.context_size,
            lam=self.lam,
            scale=self.scale,
            inject=self.inject,
            mode=self._mode,
            optimizer=optimizer,
            feature_dim=self._feature_dim,
            diagnostics=self.diagnostics_enabled,
        )
        self._features[_key(name)] = features
        self.interfaces[_key(name)] = iface
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
    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> Any:
        if not (self.training or self._building) or (self._active_mode == "backprop" and not self._building):
            return None
        if isinstance(output, Tensor):
            h, rest = output, None
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            h, rest = output[0], output[1:]
        else:
            raise TypeError(
                f"DNI-wrapped module {name or type(module).__name__!r} returned {type(output).__name__}; expected a "
                "Tensor or a tuple whose first element is a Tensor"
            )
        if not h.is_floating_point():
            return None
        iface = self._interface_for(name, module, h)
        if self._building or not h.requires_grad:
            return None
        iface.mode = self._active_mode
        out = iface(h, context=self._current_context())
        if rest is None:
            return out
        if iface.unlocked:
            rest = _detach_all(rest)  # the module is cut off: only the synthetic gradient trains it
        return type(output)((out, *rest))

    def _interface_for(self, name: str, module: nn.Module, h: Tensor) -> BackwardInterface:
        fd = self._feature_dim
        if h.dim() == 0 or not -h.dim() <= fd < h.dim():
            raise ValueError(
                f"module {name or 'net'!r} produced an activation of shape {tuple(h.shape)}, which has no feature "
                f"dimension {fd} for {self.dni_network.__name__}"
            )
        key = _key(name)
        iface = self.interfaces[key] if key in self.interfaces else self._build(name, h.shape[fd], module)
        expected = self._features[key]
        if h.shape[fd] != expected:
            hint = " (use Conv2dDNI for (B, C, H, W) feature maps)" if h.dim() == 4 and fd == -1 else ""
            raise ValueError(
                f"module {name or 'net'!r} produced an activation of shape {tuple(h.shape)}; "
                f"{self.dni_network.__name__} reads features along dim {fd} (size {h.shape[fd]}) but was built for "
                f"{expected} features, so it cannot produce this activation's gradient{hint}"
            )
        return iface

    def _current_context(self) -> Tensor | None:
        return getattr(_CONTEXT, "values", {}).get(id(self))

    # ------------------------------------------------------------------ public API
    @property
    def mode(self) -> str:
        """The configured mode: ``"dni"``, ``"observe"`` or ``"backprop"`` (``warmup_steps`` may override)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value
        self._active_mode = value

    @contextlib.contextmanager
    def context(self, context: Tensor | None) -> Iterator[None]:
        """Condition the synthesizers on ``context`` (cDNI) for the forward calls inside the ``with`` block.

        Args:
            context: ``(B, context_size)`` features (typically one-hot labels) or ``(B,)`` integer labels.

        Yields:
            Nothing; the context applies to this wrapper in the current thread.
        """
        values = _CONTEXT.__dict__.setdefault("values", {})
        previous = values.get(id(self))
        values[id(self)] = context
        try:
            yield
        finally:
            if previous is None:
                values.pop(id(self), None)
            else:
                values[id(self)] = previous

    def forward(self, *args: Any, context: Tensor | None = None, **kwargs: Any) -> Any:
        """Run the wrapped network.

        Args:
            *args: Positional arguments of the wrapped network.
            context: Optional cDNI context (one-hot ``(B, context_size)`` or integer ``(B,)`` labels); the
                keyword is consumed by the wrapper.
            **kwargs: Keyword arguments of the wrapped network.

        Returns:
            The wrapped network's output.
        """
        if self.training:
            self._active_mode = "observe" if self.num_steps < self.warmup_steps else self._mode
            self.num_steps += 1
        if context is None:
            return self.network(*args, **kwargs)
        with self.context(context):
            return self.network(*args, **kwargs)

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
        for iface in self.interfaces.values():
            yield from iface.synthesizer.parameters()

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
        return self.interfaces[key]  # type: ignore[return-value]

    def step_synthesizers(self) -> None:
        """Apply any synthesizer update still waiting (updates are otherwise applied automatically)."""
        for iface in self.interfaces.values():
            iface.step()

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Last synthesizer loss (and cosine to the target, with ``diagnostics=True``) per wrapped module.

        Returns:
            ``{module_name: {"loss": ..., "cosine": ...}}`` for interfaces that have seen a target.
        """
        out: dict[str, dict[str, float]] = {}
        for name in self._wrapped:
            iface = self.interfaces[_key(name)] if _key(name) in self.interfaces else None
            if iface is None or iface.last_loss is None:
                continue
            entry = {"loss": float(iface.last_loss)}
            if iface.last_cosine is not None:
                entry["cosine"] = float(iface.last_cosine)
            out[name] = entry
        return out

    def remove(self) -> nn.Module:
        """Remove all hooks and return the bare network.

        Returns:
            The wrapped network, no longer trained by this wrapper.
        """
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._param_optimizers.clear()
        return self.network

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """Step counter and per-interface activation sizes (lets a fresh wrapper rebuild lazy synthesizers)."""
        return {"version": 1, "num_steps": self.num_steps, "features": dict(self._features)}

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state`'s data, creating synthesizers that do not exist yet.

        Args:
            state: The dictionary saved by :meth:`get_extra_state`.
        """
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"unrecognised DNI extra state: {state!r}")
        self.num_steps = int(state["num_steps"])
        for name, module in self._wrapped.items():
            key = _key(name)
            if key not in self.interfaces and key in state["features"]:
                self._build(name, int(state["features"][key]), module)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            network = self.__dict__.get("_modules", {}).get("network")
            if network is None or name.startswith("_"):
                raise
            return getattr(network, name)


def _step_param(optimizer: torch.optim.Optimizer, param: Tensor) -> None:
    optimizer.step()
    param.grad = None

