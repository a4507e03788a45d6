"""The ``torch.optim.Optimizer`` plumbing shared by `AddSign` and `PowerSign`.

Validation, param groups (with the sign decay stored as plain data), lazy state, ``step`` and
backward-compatible ``__setstate__``. The update itself lives in `._functional`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype, _use_grad_for_differentiable

from ._functional import Rule, sign_update, sparse_sign_update
from .sign_internal_decay import SignInternalDecay, _is_serializable, decay_from_dict

__all__: list[str] = []

DecayArg = SignInternalDecay | Callable[[Any], Any] | dict[str, Any] | None

#: The param-group value that stands for a plain callable decay (the callable itself is kept outside
#: ``param_groups``, so that ``state_dict()`` holds plain data only).
CALLABLE_DECAY: dict[str, str] = {"kind": "callable"}


def _check_lr(lr: Any, *, foreach: bool | None, capturable: bool) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        value = lr.item()
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a float or a 1-element Tensor, got {type(lr).__name__}")
    else:
        value = float(lr)
    if not value >= 0.0:
        raise ValueError(f"Invalid learning rate: lr={value}; expected lr >= 0")


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name}: {value}")
    return value


def _check_beta(beta: Any) -> float:
    beta = _check_real("beta", beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid beta parameter: beta={beta}; expected 0 <= beta < 1")
    return beta


def _check_weight_decay(weight_decay: Any) -> float:
    weight_decay = _check_real("weight_decay", weight_decay)
    if not weight_decay >= 0.0:
        raise ValueError(
            f"Invalid weight_decay value: weight_decay={weight_decay}; expected weight_decay >= 0"
        )
    return weight_decay


def _decay_to_group_value(decay: DecayArg) -> tuple[dict[str, Any] | None, Callable[[Any], Any] | None]:
    """Split a ``sign_internal_decay`` argument into (plain data for the param group, live callable)."""
    if decay is None:
        return None, None
    if _is_serializable(decay):
        return cast(SignInternalDecay, decay).to_dict(), None
    if isinstance(decay, dict):
        if decay.get("kind") == CALLABLE_DECAY["kind"]:
            return dict(CALLABLE_DECAY), None
        return decay_from_dict(decay).to_dict(), None
    if callable(decay):
        return dict(CALLABLE_DECAY), decay
    raise TypeError(
        "sign_internal_decay must be None, a callable f(step) or a decay such as "
        f"LinearInternalDecay(T_max), got {type(decay).__name__}"
    )


class SignOptimizer(Optimizer):
    """Common base of `AddSign` and `PowerSign`; not meant to be instantiated directly.

    Args:
        params: Iterable of parameters (or named parameters) to optimize, or of dicts defining
            parameter groups.
        lr: Learning rate, a float or a 1-element tensor; >= 0.
        beta: Coefficient of the running average of the gradient; 0 <= beta < 1.
        alpha: The rule's constant (AddSign's additive term, PowerSign's base).
        sign_internal_decay: None (no decay), a decay object or a callable ``f(step)``.
        weight_decay: L2 penalty coefficient; >= 0.
        decoupled_weight_decay: Shrink the parameters by ``1 - lr * weight_decay`` instead of adding
            ``weight_decay * p`` to the gradient.
        maximize: Maximize the objective instead of minimizing it.
        foreach: Use the ``torch._foreach_*`` implementation (None: when all params are on CUDA/XPU).
        capturable: Keep every step-dependent quantity on the device (CUDA graphs).
        differentiable: Let autograd record the optimizer step.
    """

    _rule: ClassVar[Rule]

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor,
        beta: float,
        alpha: float,
        sign_internal_decay: DecayArg,
        *,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        _check_lr(lr, foreach=foreach, capturable=capturable)
        spec, fn = _decay_to_group_value(sign_internal_decay)
        # Set before Optimizer.__init__, which calls add_param_group.
        self._default_decay_fn = fn
        self._sign_decay_fns: dict[int, Callable[[Any], Any]] = {}
        self._decay_objects: dict[int, tuple[dict[str, Any], SignInternalDecay]] = {}
        defaults = {
            "lr": lr,
            "beta": _check_beta(beta),
            "alpha": self._check_alpha(alpha),
            "sign_internal_decay": spec,
            "weight_decay": _check_weight_decay(weight_decay),
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "maximize": bool(maximize),
            "foreach": foreach,
            "capturable": bool(capturable),
            "differentiable": bool(differentiable),
        }
        super().__init__(params, defaults)

    @classmethod
    def _check_alpha(cls, alpha: Any) -> float:
        return _check_real("alpha", alpha)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyper-parameters are validated and its decay stored as plain data.

        Args:
            param_group: Specifies the parameters and the group-specific options (any of ``lr``,
                ``beta``, ``alpha``, ``sign_internal_decay``, ``weight_decay``, ...).

        Raises:
            TypeError: If an option has the wrong type.
            ValueError: If an option is out of range.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        if "lr" in group:
            _check_lr(
                group["lr"],
                foreach=group.get("foreach", self.defaults["foreach"]),
                capturable=group.get("capturable", self.defaults["capturable"]),
            )
        if "beta" in group:
            group["beta"] = _check_beta(group["beta"])
        if "alpha" in group:
            group["alpha"] = self._check_alpha(group["alpha"])
        if "weight_decay" in group:
            group["weight_decay"] = _check_weight_decay(group["weight_decay"])
        if "sign_internal_decay" in group:
            group["sign_internal_decay"], fn = _decay_to_group_value(group["sign_internal_decay"])
        else:
            fn = self._default_decay_fn
        index = len(self.param_groups)
        super().add_param_group(group)
        if fn is not None:
            self._sign_decay_fns[index] = fn

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and param_groups; deepcopy/pickle of the
        # optimizer must also keep the live decay callables.
        state = super().__getstate__()
        state["_default_decay_fn"] = self._default_decay_fn
        state["_sign_decay_fns"] = self._sign_decay_fns
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_default_decay_fn", None)
        self.__dict__.setdefault("_sign_decay_fns", {})
        self.__dict__.setdefault("_decay_objects", {})
        for group in self.param_groups:
            group.setdefault("sign_internal_decay", None)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    step_val = float(p_state["step"])
                    p_state["step"] = (
                        torch.tensor(step_val, dtype=_get_scalar_dtype(), device=p.device)
                        if group["capturable"]
                        else torch.tensor(step_val, dtype=_get_scalar_dtype())
                    )

    def _group_decay(self, index: int, group: dict[str, Any]) -> Callable[[Any], Any] | None:
        """The live decay callable of param group ``index`` (None: no decay)."""
        value = group["sign_internal_decay"]
        if value is None:
            return None
        if isinstance(value, dict):
            if value.get("kind") == CALLABLE_DECAY["kind"]:
                fn = self._sign_decay_fns.get(index)
                if fn is None:
                    raise RuntimeError(
                        f"param group {index} uses a callable sign_internal_decay, which a state_dict cannot "
                        "hold: pass the same callable to the optimizer before load_state_dict(), or use "
                        "LinearInternalDecay / CosineInternalDecay / RestartCosineInternalDecay"
                    )
                return fn
            cached = self._decay_objects.get(index)
            if cached is None or cached[0] != value:
                cached = (dict(value), decay_from_dict(value))
                self._decay_objects[index] = cached
            return cached[1]
        if callable(value):
            return value
        raise TypeError(
            f"param group {index}: sign_internal_decay must be None, a callable or a decay spec dict, "
            f"got {type(value).__name__}"
        )

    def _check_sparse(self, index: int, group: dict[str, Any], grad: Tensor) -> None:
        """Refuse, with the reason, what the sparse (TensorFlow ``_apply_sparse``) path does not do."""
        name = type(self).__name__
        if grad.layout != torch.sparse_coo:
            raise RuntimeError(
                f"{name} supports sparse gradients in the sparse COO layout only (e.g. nn.Embedding(sparse=True)), "
                f"got layout {grad.layout}; convert the gradient with .to_sparse() or .to_dense()"
            )
        for option, value, why in (
            (
                "weight_decay",
                group["weight_decay"] != 0,
                "TensorFlow's sparse update has none and it would touch every row",
            ),
            ("differentiable", group["differentiable"], "autograd through a sparse step is not supported"),
            ("capturable", group["capturable"], "coalescing a sparse gradient syncs with the host"),
        ):
            if value:
                raise RuntimeError(
                    f"{name}: param group {index} has {option}={group[option]!r}, which sparse gradients do "
                    f"not support ({why}); set {option} to its default for the parameters with sparse "
                    "gradients (a separate param group), or use dense gradients"
                )

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        state_steps: list[Tensor],
        sparse: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None,
        index: int = 0,
    ) -> bool:
        """Collect the group's parameters with a gradient and their state (created lazily).

        Parameters whose gradient is sparse go to the four ``sparse`` lists instead (params, grads,
        exp_avgs, steps); without them, a sparse gradient raises.
        """
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            is_sparse = grad.layout != torch.strided
            if is_sparse:
                self._check_sparse(index, group, grad)
                if sparse is None:
                    raise RuntimeError(f"{type(self).__name__}._init_group got a sparse gradient")
            else:
                has_complex |= torch.is_complex(p)
                if grad.is_conj() or grad.is_neg():
                    # Lazily conjugated / negated views: the update reads them through view_as_real.
                    grad = grad.resolve_conj().resolve_neg()
            state = self.state[p]
            if len(state) == 0:
                # Like torch.optim.Adam: the step lives on the CPU unless capturable.
                state["step"] = (
                    torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
                    if group["capturable"]
                    else torch.tensor(0.0, dtype=_get_scalar_dtype())
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
            lists = sparse if is_sparse and sparse is not None else (params, grads, exp_avgs, state_steps)
            lists[0].append(p)
            lists[1].append(grad)
            lists[2].append(state["exp_avg"])
            lists[3].append(state["step"])
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure: A closure that re-evaluates the model and returns the loss (optional).

        Returns:
            The loss returned by ``closure``, or None.
        """
        health_check = getattr(self, "_accelerator_graph_capture_health_check", None)
        if health_check is None:  # torch < 2.6
            health_check = self._cuda_graph_capture_health_check
        health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Refuse unsupported sparse settings before any group is updated (no half-done step).
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None and p.grad.layout != torch.strided:
                    self._check_sparse(index, group, p.grad)

        for index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            state_steps: list[Tensor] = []
            sparse: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] = ([], [], [], [])
            has_complex = self._init_group(group, params, grads, exp_avgs, state_steps, sparse, index)
            if sparse[0]:
                sparse_sign_update(
                    *sparse,
                    rule=self._rule,
                    lr=group["lr"],
                    beta=group["beta"],
                    alpha=group["alpha"],
                    sign_decay=self._group_decay(index, group),
                    maximize=group["maximize"],
                )
            sign_update(
                params,
                grads,
                exp_avgs,
                state_steps,
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                has_complex=has_complex,
                rule=self._rule,
                lr=group["lr"],
                beta=group["beta"],
                alpha=group["alpha"],
                sign_decay=self._group_decay(index, group),
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"],
            )
        return loss
