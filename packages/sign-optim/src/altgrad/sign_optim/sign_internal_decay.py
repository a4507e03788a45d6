"""Internal sign decays: the schedules ``d(t)`` that scale ``sign(g) * sign(m)``.

The three schedules are TensorFlow's ``tf.contrib.opt`` sign decays (``sign_decay.py``), the
``ld``, ``cd`` and ``rd`` functions of Bello et al. (2017). Each one first clamps the step to
``T_max`` (TensorFlow's ``decay_steps``):

* linear: ``d(t) = (T_max - min(t, T_max)) / T_max``;
* cosine: ``d(t) = 0.5 * (1 + cos(2 * pi * num_periods * min(t, T_max) / T_max))``, and 0 once
  ``num_periods * min(t, T_max) / T_max >= zero_after`` (``zero_after`` counts full periods);
* restart: ``d(t) = 0.5 * (1 + cos(pi * ((num_periods * min(t, T_max)) mod T_max) / T_max))``, and 0
  once ``num_periods * min(t, T_max) / T_max >= zero_after`` (``zero_after`` counts restarts).
  Because of the clamp and the ``mod``, the restart decay is **1.0** for every ``t >= T_max`` when
  ``num_periods`` is an integer, exactly as in TensorFlow.

A decay object is a callable ``decay(step)``. It accepts a Python number (and then returns a Python
float, computed in double precision) or a tensor (and then returns a tensor, computed with tensor
ops in float64 where the device has it, so that a compiled or capturable optimizer step does not
recompile or synchronise every step).

Unlike an arbitrary callable, a decay object converts to plain data (`SignInternalDecay.to_dict`)
and back (`decay_from_dict`), which is what the optimizers store in their param groups so that
``optimizer.state_dict()`` survives ``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "CosineInternalDecay",
    "LinearInternalDecay",
    "RestartCosineInternalDecay",
    "SignInternalDecay",
    "decay_from_dict",
]


def _check_T_max(T_max: Any) -> int:
    if isinstance(T_max, bool) or not isinstance(T_max, numbers.Integral):
        raise TypeError(f"T_max must be an int (the total number of steps), got {type(T_max).__name__}")
    if T_max < 1:
        raise ValueError(f"Invalid T_max: {T_max}; expected T_max >= 1")
    return int(T_max)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value}; expected a finite number")
    return value


def _check_num_periods(num_periods: Any) -> float:
    num_periods = _check_real("num_periods", num_periods)
    if num_periods <= 0:
        raise ValueError(f"Invalid num_periods: {num_periods}; expected num_periods > 0")
    return num_periods


def _check_zero_after(zero_after: Any) -> float | None:
    if zero_after is None:
        return None
    zero_after = _check_real("zero_after", zero_after)
    if zero_after < 0:
        raise ValueError(f"Invalid zero_after: {zero_after}; expected zero_after >= 0 or None")
    return zero_after


def _clamped_step(step: Any, T_max: int) -> float | Tensor:
    """Return ``min(step, T_max)`` as a Python float or as a float64 (where supported) tensor."""
    if isinstance(step, Tensor):
        dtype = torch.float64 if step.device.type in ("cpu", "cuda") else torch.float32
        return torch.clamp(step.to(dtype), max=T_max)
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"step must be a number or a tensor, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"Invalid step: {step}; expected step >= 0")
    return min(float(step), float(T_max))


def _cos(x: float | Tensor) -> float | Tensor:
    return torch.cos(x) if isinstance(x, Tensor) else math.cos(x)


def _zero_where(condition: bool | Tensor, value: float | Tensor) -> float | Tensor:
    if isinstance(value, Tensor):
        return torch.where(torch.as_tensor(condition), torch.zeros_like(value), value)
    return 0.0 if condition else value


class SignInternalDecay:
    """Base class of the built-in sign decays.

    Subclasses implement ``__call__`` and `to_dict`. Instances compare equal when their
    plain-data descriptions are equal.
    """

    kind: ClassVar[str] = ""

    def __call__(self, step: float | Tensor) -> float | Tensor:
        """Evaluate the decay at ``step`` (0-based; the t-th optimizer step uses ``step = t - 1``).

        Args:
            step: A non-negative Python number or a 0-dim tensor.

        Returns:
            The decay value: a Python float for a number, a tensor for a tensor.
        """
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Describe the decay as plain data (``str``, ``int``, ``float`` and ``None`` values only).

        Returns:
            A dict with a ``"kind"`` key, accepted by `decay_from_dict`.
        """
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignInternalDecay):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class LinearInternalDecay(SignInternalDecay):
    """Linear decay ``ld``: ``d(t) = 1 - min(t, T_max) / T_max``, from 1 at step 0 to 0 at ``T_max``.

    This is TensorFlow's ``get_linear_decay_fn(decay_steps=T_max)``.

    Args:
        T_max: The total number of training steps (optimizer steps, not epochs); an int >= 1.

    Raises:
        TypeError: If ``T_max`` is not an int.
        ValueError: If ``T_max < 1``.

    Examples:
        >>> decay = LinearInternalDecay(10)
        >>> [decay(t) for t in (0, 5, 10, 20)]
        [1.0, 0.5, 0.0, 0.0]
    """

    kind: ClassVar[str] = "linear"

    def __init__(self, T_max: int) -> None:
        self.T_max = _check_T_max(T_max)

    def __call__(self, step: float | Tensor) -> float | Tensor:
        """Evaluate the decay at ``step``.

        Args:
            step: A non-negative Python number or a 0-dim tensor.

        Returns:
            ``(T_max - min(step, T_max)) / T_max``, a float or a tensor.
        """
        t = _clamped_step(step, self.T_max)
        return (self.T_max - t) / self.T_max

    def to_dict(self) -> dict[str, Any]:
        """Describe the decay as plain data.

        Returns:
            ``{"kind": "linear", "T_max": T_max}``.
        """
        return {"kind": self.kind, "T_max": self.T_max}


class CosineInternalDecay(SignInternalDecay):
    """Cyclical (cosine) decay ``cd``: ``0.5 * (1 + cos(2 pi num_periods min(t, T_max) / T_max))``.

    This is TensorFlow's ``get_cosine_decay_fn(decay_steps=T_max, num_periods, zero_after)``. With the
    default ``num_periods=0.5`` it falls from 1 to 0 over ``T_max`` steps and stays 0; with an integer
    ``num_periods`` it ends at 1.

    Args:
        T_max: The total number of training steps; an int >= 1.
        num_periods: Number of cosine periods between step 0 and ``T_max``; > 0.
        zero_after: If not None, the decay is 0 once ``num_periods * min(t, T_max) / T_max >= zero_after``,
            i.e. after ``zero_after`` full periods; >= 0.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``T_max < 1``, ``num_periods <= 0`` or ``zero_after < 0``.

    Examples:
        >>> decay = CosineInternalDecay(1000)
        >>> round(decay(500), 12), decay(1000)
        (0.5, 0.0)
    """

    kind: ClassVar[str] = "cosine"

    def __init__(self, T_max: int, num_periods: float = 0.5, zero_after: float | None = None) -> None:
        self.T_max = _check_T_max(T_max)
        self.num_periods = _check_num_periods(num_periods)
        self.zero_after = _check_zero_after(zero_after)

    def __call__(self, step: float | Tensor) -> float | Tensor:
        """Evaluate the decay at ``step``.

        Args:
            step: A non-negative Python number or a 0-dim tensor.

        Returns:
            The decay value, a float or a tensor.
        """
        t = _clamped_step(step, self.T_max)
        fraction = 2.0 * self.num_periods * (t / self.T_max)
        decayed = 0.5 * (1.0 + _cos(math.pi * fraction))
        if self.zero_after is not None:
            decayed = _zero_where(fraction >= 2.0 * self.zero_after, decayed)
        return decayed

    def to_dict(self) -> dict[str, Any]:
        """Describe the decay as plain data.

        Returns:
            ``{"kind": "cosine", "T_max": ..., "num_periods": ..., "zero_after": ...}``.
        """
        return {
            "kind": self.kind,
            "T_max": self.T_max,
            "num_periods": self.num_periods,
            "zero_after": self.zero_after,
        }


class RestartCosineInternalDecay(SignInternalDecay):
    """Restart decay ``rd``: ``0.5 * (1 + cos(pi ((num_periods min(t, T_max)) mod T_max) / T_max))``.

    This is TensorFlow's ``get_restart_decay_fn(decay_steps=T_max, num_periods, zero_after)``
    (SGDR-style warm restarts). Each period lasts ``T_max / num_periods`` steps, decays from 1 toward 0
    and jumps back to 1. For an integer ``num_periods`` the value is **1.0** for every
    ``t >= T_max``, as in TensorFlow (its docstring claims 0, its code gives 1).

    Args:
        T_max: The total number of training steps; an int >= 1.
        num_periods: Number of restart periods between step 0 and ``T_max``; > 0.
        zero_after: If not None, the decay is 0 once ``num_periods * min(t, T_max) / T_max >= zero_after``,
            i.e. after ``zero_after`` restarts (TensorFlow's rule; cydonia999's PyTorch port tests a
            different quantity and never reaches 0); >= 0.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``T_max < 1``, ``num_periods <= 0`` or ``zero_after < 0``.

    Examples:
        >>> decay = RestartCosineInternalDecay(1000, num_periods=5, zero_after=2)
        >>> [round(decay(t), 12) for t in (0, 100, 200, 400)]
        [1.0, 0.5, 1.0, 0.0]
    """

    kind: ClassVar[str] = "restart"

    def __init__(self, T_max: int, num_periods: float = 1, zero_after: float | None = None) -> None:
        self.T_max = _check_T_max(T_max)
        self.num_periods = _check_num_periods(num_periods)
        self.zero_after = _check_zero_after(zero_after)

    def __call__(self, step: float | Tensor) -> float | Tensor:
        """Evaluate the decay at ``step``.

        Args:
            step: A non-negative Python number or a 0-dim tensor.

        Returns:
            The decay value, a float or a tensor.
        """
        t = _clamped_step(step, self.T_max)
        periods_done = self.num_periods * t
        num: float | Tensor
        if isinstance(periods_done, Tensor):
            num = torch.remainder(periods_done, self.T_max)
        else:
            num = periods_done % self.T_max
        decayed = 0.5 * (1.0 + _cos(math.pi * (num / self.T_max)))
        if self.zero_after is not None:
            decayed = _zero_where(periods_done / self.T_max >= self.zero_after, decayed)
        return decayed

    def to_dict(self) -> dict[str, Any]:
        """Describe the decay as plain data.

        Returns:
            ``{"kind": "restart", "T_max": ..., "num_periods": ..., "zero_after": ...}``.
        """
        return {
            "kind": self.kind,
            "T_max": self.T_max,
            "num_periods": self.num_periods,
            "zero_after": self.zero_after,
        }


_KINDS: dict[str, type[SignInternalDecay]] = {
    cls.kind: cls for cls in (LinearInternalDecay, CosineInternalDecay, RestartCosineInternalDecay)
}


def _is_serializable(decay: object) -> bool:
    """Whether ``decay`` is one of the built-in decays, which ``decay_from_dict`` can rebuild."""
    return isinstance(decay, SignInternalDecay) and _KINDS.get(decay.kind) is type(decay)


def decay_from_dict(spec: dict[str, Any]) -> SignInternalDecay:
    """Rebuild a decay from the plain data returned by `SignInternalDecay.to_dict`.

    Args:
        spec: A dict with a ``"kind"`` key (``"linear"``, ``"cosine"`` or ``"restart"``) and the
            constructor arguments of that decay.

    Returns:
        The decay object.

    Raises:
        TypeError: If ``spec`` is not a dict.
        ValueError: If ``spec["kind"]`` is unknown or the arguments are invalid.
    """
    if not isinstance(spec, dict):
        raise TypeError(f"a sign decay spec must be a dict, got {type(spec).__name__}")
    kwargs = dict(spec)
    kind = kwargs.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown sign decay kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](**kwargs)
