r"""Reinforcement-learning helpers built on [`discounted_cumsum`][altgrad.discounted_cumsum.discounted_cumsum].

Conventions: ``dones[t]`` is True when the episode ended at step ``t`` (after reward ``rewards[t]``), so nothing
from step ``t + 1`` flows back into step ``t``. ``bootstrap`` is the value estimate of the state reached after the
last step (use 0, the default, when the rollout ended in a terminal state). Time runs along ``dim``.
"""

from __future__ import annotations

import torch

from ._args import compute_dtype
from .core import discounted_cumsum


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

    Example:
        >>> import torch
        >>> r = torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> discounted_returns(r, 0.5, dones=torch.tensor([False, True, False, False]))
        tensor([1.5000, 1.0000, 1.5000, 1.0000])
    """
    return discounted_cumsum(rewards, gamma, dim=dim, reverse=True, dones=dones, initial=bootstrap)


def generalized_advantage_estimate(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
    dones: torch.Tensor | None = None,
    bootstrap: float | torch.Tensor | None = None,
    dim: int = -1,
) -> torch.Tensor:
    r"""Generalized advantage estimation (Schulman et al., 2016).

    $\delta_t = r_t + \gamma (1 - d_t) V_{t+1} - V_t$ and
    $A_t = \delta_t + \gamma \lambda (1 - d_t) A_{t+1}$, with $V_T$ = ``bootstrap`` and
    $A_T = 0$. The value targets used by PPO are ``advantages + values``.

    Args:
        rewards: Rewards, time along ``dim``.
        values: Value estimates $V_t$ of the states at each step, same shape as ``rewards``.
        gamma: Discount: a number or a tensor broadcastable to ``rewards`` (a per-row tensor is also accepted).
        lam: GAE $\lambda$: a number or a tensor like ``gamma``.
        dones: Optional episode ends, broadcastable to ``rewards``.
        bootstrap: Optional value of the state after the last step, shape of ``rewards`` without ``dim``.
        dim: Time dimension.

    Returns:
        The advantages, shaped like ``rewards``.

    Raises:
        TypeError: If ``rewards`` is not a floating tensor with at least one dimension.
        ValueError: If ``values`` does not have the shape of ``rewards``.
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
    if not -rewards.dim() <= dim < rewards.dim():
        raise IndexError(f"`dim` is {dim} but `rewards` has {rewards.dim()} dimension(s)")
    d = dim % rewards.dim()
    n = rewards.shape[d]
    cd = compute_dtype(rewards.dtype)
    row_shape = rewards.shape[:d] + rewards.shape[d + 1 :]
    if bootstrap is None:
        last = torch.zeros(row_shape, dtype=cd, device=rewards.device)
    else:
        last = torch.as_tensor(bootstrap, dtype=cd, device=rewards.device).expand(row_shape)
    v = values.to(cd)
    next_values = torch.cat([v.narrow(d, 1, n - 1), last.unsqueeze(d)], d) if n > 0 else v
    not_done = 1.0 if dones is None else (dones == 0).to(cd)
    g = gamma.to(cd) if isinstance(gamma, torch.Tensor) else gamma
    if (
        isinstance(g, torch.Tensor)
        and g.dim() == rewards.dim() - 1
        and g.shape == row_shape
        and rewards.dim() > 1
    ):
        g = g.unsqueeze(d)  # per-row discount, as accepted by discounted_cumsum
    lm = lam.to(cd) if isinstance(lam, torch.Tensor) else lam
    if (
        isinstance(lm, torch.Tensor)
        and lm.dim() == rewards.dim() - 1
        and lm.shape == row_shape
        and rewards.dim() > 1
    ):
        lm = lm.unsqueeze(d)
    delta = rewards.to(cd) + g * not_done * next_values - v
    gl = g * lm
    adv = discounted_cumsum(delta, gl, dim=d, reverse=True, dones=dones)
    return adv.to(rewards.dtype)
