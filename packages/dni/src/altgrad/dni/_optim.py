"""Resolve the ``grad_optim`` / ``optim`` specifications of :class:`~altgrad.dni.DNI` into optimizer factories."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.optim.optimizer as _optimizer_module
from torch import Tensor

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adamax": torch.optim.Adamax,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}

Factory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class _Build:
    """``params -> cls(params, **kwargs)``: a picklable optimizer factory (no lambdas, so wrappers pickle)."""

    def __init__(self, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        self.cls = cls
        self.kwargs = kwargs

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        tensors = list(params)
        if self.kwargs.get("fused") and not _fusable(tensors):
            kwargs = {**{k: v for k, v in self.kwargs.items() if k != "fused"}, "foreach": True}
            return self.cls(tensors, **kwargs)
        return self.cls(tensors, **self.kwargs)


#: Optimizers with a fused kernel on CPU and CUDA: one kernel per step instead of a dozen foreach calls (the
#: wrapper steps one optimizer per wrapped module and step, so their Python overhead is on the hot path).
_FUSED = ("adam", "adamw", "sgd", "adagrad")


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether the fused kernels take ``params`` (floating point, on CPU or CUDA, one device)."""
    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and devices <= {"cpu", "cuda"}
        and all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params)
    )


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """Every parameter ``optimizer`` holds, group by group (the order of its ``state_dict()`` ids)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def group_options(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's options (learning rate, betas...): everything but its ``params``."""
    return {k: v for k, v in group.items() if k != "params"}


def join_group(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Add ``params`` to ``optimizer``'s first parameter group (the one it was built with), with its options.

    One group means one update call per step however many modules' parameters it holds (a group per module
    costs one call each: about 25 µs of Python on CPU). A fused group that cannot take ``params`` (another
    kind of device or dtype) gets them in a new group without the fused kernel, and an optimizer class with its
    own ``add_param_group`` (one that sets up state there, say) gets them through it, in a new group.
    """
    group = optimizer.param_groups[0]
    # a new group takes the first group's options as they are now (a scheduled learning rate, say)
    options = group_options(group)
    if type(optimizer).add_param_group is not _ADD_PARAM_GROUP:
        optimizer.add_param_group({**options, "params": params})
        return
    held = {id(p) for p in optimizer_params(optimizer)}
    if any(id(p) in held for p in params):
        raise ValueError("some parameters are already in the optimizer")  # as add_param_group says
    if group.get("fused") and not _fusable([*group["params"], *params]):
        optimizer.add_param_group({**options, "params": params, "fused": None})
        return
    group["params"].extend(params)


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its profiler record (a few µs per call, every step).

    An optimizer with its own ``zero_grad`` (its class's, or one set on the instance: one that keeps gradients
    elsewhere, say) gets that called, and so does any optimizer while the profiler records (its trace shows the
    call).
    """
    if type(optimizer).zero_grad is not _ZERO_GRAD or "zero_grad" in vars(optimizer) or _profiling():
        optimizer.zero_grad(set_to_none=True)
        return
    for p in optimizer_params(optimizer):
        p.grad = None


_ZERO_GRAD = torch.optim.Optimizer.zero_grad


def _profiling() -> bool:
    """Whether torch's profiler records (torch's private flag: where it is missing, assume it does)."""
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", True))


def update(optimizer: torch.optim.Optimizer) -> None:
    """:func:`optimizer_step` then :func:`clear_grads`: apply the gradients and drop them."""
    optimizer_step(optimizer)
    clear_grads(optimizer)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``.

    A fused ``Adam`` or ``AdamW`` on CPU whose state exists runs its kernel directly (:func:`_fused_adam_calls`):
    ``Adam.step`` spends about 25 µs of Python around a kernel of a few µs for a module's tensors (its profiler
    record, step hooks, gradient-mode switch, per-parameter checks, device grouping), and the wrapper steps one
    optimizer per wrapped module on every training step, so this was its largest cost (issue 25, item 4). The
    kernel gets what ``Adam.step`` gives it: the parameters that have a gradient, their state and the group's
    options; the step counters move first, as there.
    """
    calls = _fused_adam_calls(optimizer)
    if calls is None:
        optimizer.step()
    else:
        with torch.no_grad():
            for kernel, tensors, options in calls:
                torch._foreach_add_(tensors[5], 1)
                kernel(*tensors, **options)


#: The kernels ``torch.optim.Adam`` runs with ``fused=True``: (coupled, decoupled) weight decay.
_ADAM_KERNELS = (getattr(torch, "_fused_adam_", None), getattr(torch, "_fused_adamw_", None))


def _torch_adam_steps() -> dict[type, Any]:
    """``Adam.step`` and ``AdamW.step`` as torch defines them (wrapped for its profiler at the first construction)."""
    probe = [torch.zeros(1, requires_grad=True)]
    torch.optim.Adam(probe)
    torch.optim.AdamW(probe)
    return {cls: cls.step for cls in (torch.optim.Adam, torch.optim.AdamW)}


#: A class whose ``step`` was replaced after this (a patch, a mock) is left to it.
_ADAM_STEPS = _torch_adam_steps()


def _fused_adam_calls(
    optimizer: torch.optim.Optimizer,
) -> list[tuple[Any, list[list[Any]], dict[str, Any]]] | None:
    """The kernel calls ``optimizer.step()`` would make, or ``None`` when it must run itself.

    ``None`` (``optimizer.step()`` runs) for any other class or a subclass, a replaced ``step`` (on the class, or on
    the instance, as an LR scheduler does to count calls), step hooks (the optimizer's or global ones), a running
    profiler (its trace shows the step), a ``GradScaler``'s attributes, state not yet created (``step`` creates
    it), a sparse or complex gradient, tensors that ``step`` would group apart or refuse (parameters off the CPU,
    a gradient or state tensor of another device or dtype than its parameter, mixed dtypes in a group), or options
    this call does not pass: not ``fused``, ``capturable``, ``differentiable``, tensor ``lr`` or ``betas``, a group
    without ``decoupled_weight_decay``. Decides before anything moves, so a fallback never follows a partial update
    (where ``step`` raises for a later group, this raises before the first one moves).
    """
    cls = type(optimizer)
    if (
        _ADAM_STEPS.get(cls) is not cls.step  # another class, a subclass, or torch's step replaced
        or None in _ADAM_KERNELS
        or "step" in vars(optimizer)  # replaced on the instance: an LR scheduler counts the calls
        or _profiling()  # the trace shows Optimizer.step
        # hook registries (torch's private names: where one is missing, hooks are assumed)
        or getattr(optimizer, "_optimizer_step_pre_hooks", True)
        or getattr(optimizer, "_optimizer_step_post_hooks", True)
        or getattr(_optimizer_module, "_global_optimizer_pre_hooks", True)
        or getattr(_optimizer_module, "_global_optimizer_post_hooks", True)
        or getattr(optimizer, "grad_scale", None) is not None
        or getattr(optimizer, "found_inf", None) is not None
    ):
        return None
    calls = []
    for group in optimizer.param_groups:
        amsgrad = bool(group["amsgrad"])
        dtype = group["params"][0].dtype if group["params"] else None
        params: list[Tensor] = []
        grads: list[Tensor] = []
        avgs: list[Tensor] = []
        squares: list[Tensor] = []
        maxima: list[Tensor] = []
        steps: list[Tensor] = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = optimizer.state.get(p)
            if not state or p.device.type != "cpu" or p.is_complex() or grad.layout != torch.strided:
                return None
            moments = [state["exp_avg"], state["exp_avg_sq"]]
            if amsgrad:
                moments.append(state["max_exp_avg_sq"])
            step = state["step"]
            if (
                not isinstance(step, Tensor)
                or step.device != p.device
                # a gradient has its parameter's dtype and device (torch refuses any other .grad)
                or grad.dtype != dtype
                or any(m.device != p.device or m.dtype != dtype for m in moments)
            ):
                return None  # step() groups tensors by device and dtype, or refuses them, before any change
            params.append(p)
            grads.append(grad)
            avgs.append(moments[0])
            squares.append(moments[1])
            if amsgrad:
                maxima.append(moments[2])
            steps.append(step)
        if not params:
            continue
        lr, betas = group["lr"], group["betas"]
        if (
            group.get("fused") is not True
            or group.get("capturable")
            or group.get("differentiable")
            or not all(isinstance(v, (float, int)) for v in (lr, *betas, group["eps"], group["weight_decay"]))
        ):
            return None
        options = {
            "lr": float(lr),
            "beta1": float(betas[0]),
            "beta2": float(betas[1]),
            "weight_decay": float(group["weight_decay"]),
            "eps": float(group["eps"]),
            "amsgrad": amsgrad,
            "maximize": bool(group["maximize"]),
        }
        decoupled = group.get("decoupled_weight_decay")
        if decoupled is None:  # step() needs it (a KeyError there) or, in an older torch, has its own rule
            return None
        calls.append((_ADAM_KERNELS[bool(decoupled)], [params, grads, avgs, squares, maxima, steps], options))
    return calls


_ADD_PARAM_GROUP = torch.optim.Optimizer.add_param_group


def optimizer_factory(spec: Any, lr: float, name: str) -> Factory | None:
    """Turn ``spec`` into ``params -> Optimizer``.

    ``spec`` may be ``None`` (no optimizer), a name from :data:`OPTIMIZERS`, an ``Optimizer`` subclass (built
    with ``lr``), or an ``Optimizer`` instance (its class and ``defaults`` are copied, as pytorch-dni does).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.lower()
        if key not in OPTIMIZERS:
            raise ValueError(
                f"unknown {name} {spec!r}; expected one of {sorted(OPTIMIZERS)}, an Optimizer class or None"
            )
        # fused where torch has the kernel (same update rule, one kernel: about 2.5x less time per step for a
        # module's few tensors on CPU), else foreach (one pass over the tensors instead of a Python loop).
        flavour = {"fused": True} if key in _FUSED else {"foreach": True}
        return _Build(OPTIMIZERS[key], {"lr": lr, **flavour})
    if isinstance(spec, torch.optim.Optimizer):
        return _Build(type(spec), dict(spec.defaults))
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return _Build(spec, {"lr": lr})
    raise TypeError(
        f"{name} must be None, a string, an Optimizer class or instance, got {type(spec).__name__}"
    )
