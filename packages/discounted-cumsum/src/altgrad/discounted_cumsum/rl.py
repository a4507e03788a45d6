r"""Reinforcement-learning helpers built on [`discounted_cumsum`][altgrad.discounted_cumsum.discounted_cumsum].

Conventions: ``dones[t]`` is True when the episode ended at step ``t`` (after reward ``rewards[t]``), so nothing
from step ``t + 1`` flows back into step ``t``. ``bootstrap`` is the value estimate of the state reached after the
last step (use 0, the default, when the rollout ended in a terminal state). Time runs along ``dim``.
"""

from __future__ import annotations

import torch

from . import _rl
from .core import discounted_cumsum


def _bootstrap(bootstrap, rewards: torch.Tensor, d: int):
    """Checks ``bootstrap`` (None, a number, or a tensor broadcastable to ``rewards`` without dim ``d``)."""
    if bootstrap is None or (isinstance(bootstrap, (int, float)) and not isinstance(bootstrap, bool)):
        return None if bootstrap is None else torch.tensor(float(bootstrap), device=rewards.device)
    if isinstance(bootstrap, torch.Tensor) and bootstrap.device != rewards.device and bootstrap.dim() > 0:
        raise ValueError(f"`bootstrap` is on {bootstrap.device} but `rewards` is on {rewards.device}")
    row_shape = rewards.shape[:d] + rewards.shape[d + 1 :]
    if not isinstance(bootstrap, torch.Tensor) or not (
        bootstrap.is_floating_point() or bootstrap.dtype in (torch.int32, torch.int64)
    ):
        kind = bootstrap.dtype if isinstance(bootstrap, torch.Tensor) else type(bootstrap).__name__
        raise TypeError(f"`bootstrap` must be a number or a real tensor, got {kind}")
    if bootstrap.dim() > len(row_shape) or any(
        s not in (1, t) for s, t in zip(reversed(bootstrap.shape), reversed(row_shape))
    ):
        raise ValueError(
            f"`bootstrap` of shape {tuple(bootstrap.shape)} does not broadcast to the shape of `rewards` without "
            f"the time dim, {tuple(row_shape)}"
        )
    return bootstrap


def discounted_returns(
    rewards: torch.Tensor,
    gamma: float | torch.Tensor,
    dones: torch.Tensor | None = None,
    bootstrap: float | torch.Tensor | None = None,
    dim: int = -1,
) -> torch.Tensor:
    r"""Discounted returns $R_t = r_t + \gamma_t (1 - d_t) R_{t+1}$ with $R_T$ = ``bootstrap``.

    Args:
        rewards: Rewards, time along ``dim`` (e.g. ``[T]``, batch-major ``[B, T]`` or time-major ``[T, B]`` with
            ``dim=0``).
        gamma: Discount: a number, a per-row tensor or a tensor broadcastable to ``rewards``.
        dones: Optional episode ends, broadcastable to ``rewards``.
        bootstrap: Optional value of the state after the last step, shape of ``rewards`` without ``dim``.
        dim: Time dimension.

    Returns:
        The returns, shaped like ``rewards``. Differentiable w.r.t. ``rewards``, ``gamma`` and ``bootstrap``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``gamma``, ``dones`` or ``bootstrap`` does not fit the shape of ``rewards``.

    Example:
        >>> import torch
        >>> r = torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> discounted_returns(r, 0.5, dones=torch.tensor([False, True, False, False]))
        tensor([1.5000, 1.0000, 1.5000, 1.0000])
    """
    if isinstance(rewards, torch.Tensor) and rewards.dim() > 0 and -rewards.dim() <= dim < rewards.dim():
        _bootstrap(bootstrap, rewards, dim % rewards.dim())  # errors name `bootstrap`, not `initial`
    return discounted_cumsum(rewards, gamma, dim=dim, reverse=True, dones=dones, initial=bootstrap)


def generalized_advantage_estimate(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
    dones: torch.Tensor | None = None,
    bootstrap: float | torch.Tensor | None = None,
    dim: int = -1,
    *,
    terminated: torch.Tensor | None = None,
    next_values: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Generalized advantage estimation (Schulman et al., 2016), fused into one pass of the C++ kernel.

    $\delta_t = r_t + \gamma (1 - \mathrm{term}_t) V'_t - V_t$ and
    $A_t = \delta_t + \gamma \lambda (1 - d_t) A_{t+1}$, with $A_T = 0$. The next value $V'_t$ is
    ``next_values[t]`` when given, else $V_{t+1}$ (and ``bootstrap`` after the last step). The value targets used
    by PPO are ``advantages + values``.

    Without ``terminated``, ``dones`` are terminal states (no bootstrap, as in CleanRL and SB3's buffer without
    timeouts). With ``terminated``, ``dones`` mark every episode end and ``terminated`` the terminal ones; a done step
    that is not terminated (a time-limit truncation) bootstraps from ``next_values[t]``, the value of the state the
    episode was cut at, which is why ``terminated`` needs ``next_values``. A terminated step also ends the episode.

    On CPU tensors with no gradient needed this runs the fused kernel (no temporaries); otherwise the same formula
    runs on the differentiable scan (gradients w.r.t. rewards, values, next values, bootstrap, gamma and lam).

    Args:
        rewards: Rewards, time along ``dim``.
        values: Value estimates $V_t$ of the states at each step, same shape as ``rewards``.
        gamma: Discount: a number or a tensor broadcastable to ``rewards`` (a per-row tensor is also accepted).
        lam: GAE $\lambda$: a number or a tensor like ``gamma``.
        dones: Optional episode ends, broadcastable to ``rewards``.
        bootstrap: Optional value of the state after the last step, shape of ``rewards`` without ``dim``
            (only without ``next_values``).
        dim: Time dimension.
        terminated: Optional terminal flags, broadcastable to ``rewards`` (needs ``next_values``).
        next_values: Optional values of the states after each step, same shape as ``rewards``.

    Returns:
        The advantages, shaped like ``rewards``.

    Raises:
        TypeError: If ``rewards`` is not a floating tensor with at least one dimension, or ``gamma``, ``lam``,
            ``dones``, ``terminated`` or ``bootstrap`` has the wrong type.
        ValueError: If ``values`` or ``next_values`` does not have the shape of ``rewards``, ``gamma``, ``lam``,
            ``dones``, ``terminated`` or ``bootstrap`` does not fit it, ``terminated`` comes without
            ``next_values``, or both ``bootstrap`` and ``next_values`` are given.
        IndexError: If ``dim`` is out of range.

    Example:
        >>> import torch
        >>> r = torch.tensor([1.0, 0.0, 1.0])
        >>> v = torch.tensor([0.5, 0.5, 0.5])
        >>> generalized_advantage_estimate(r, v, gamma=1.0, lam=1.0)
        tensor([1.5000, 0.5000, 0.5000])
    """
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point() or rewards.dim() == 0:
        raise TypeError("`rewards` must be a floating tensor with at least one dimension")
    if not isinstance(values, torch.Tensor) or values.shape != rewards.shape:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"`values` must have the shape of `rewards` {tuple(rewards.shape)}, got {shape}")
    if terminated is not None and next_values is None:
        raise ValueError(
            "`terminated` needs `next_values`: a truncated step bootstraps from the value of the state it was cut "
            "at, which `values` does not hold"
        )
    if terminated is None:
        terminated = dones
    names = {"reward": "rewards", "value": "values", "next_value": "next_values", "done": "dones"}
    adv, _ = _rl.estimate(
        _rl.GAE,
        rewards,
        values,
        next_values,
        gamma,
        lam,
        done=dones,
        terminated=terminated,
        bootstrap=bootstrap,
        dim=dim,
        second=False,
        names=names,
    )
    return adv.to(rewards.dtype)
