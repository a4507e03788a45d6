"""Resolve the ``grad_optim`` / ``optim`` specifications of :class:`~altgrad.dni.DNI` into optimizer factories."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

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

    An optimizer class with its own ``zero_grad`` (one that keeps gradients elsewhere, say) gets that called.
    """
    if type(optimizer).zero_grad is not _ZERO_GRAD:
        optimizer.zero_grad(set_to_none=True)
        return
    for p in optimizer_params(optimizer):
        p.grad = None


_ZERO_GRAD = torch.optim.Optimizer.zero_grad
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
