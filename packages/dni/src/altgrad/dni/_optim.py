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
        return self.cls(params, **self.kwargs)


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
        # foreach: one fused pass over a module's few tensors instead of a Python loop (same maths).
        return _Build(OPTIMIZERS[key], {"lr": lr, "foreach": True})
    if isinstance(spec, torch.optim.Optimizer):
        return _Build(type(spec), dict(spec.defaults))
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return _Build(spec, {"lr": lr})
    raise TypeError(
        f"{name} must be None, a string, an Optimizer class or instance, got {type(spec).__name__}"
    )
