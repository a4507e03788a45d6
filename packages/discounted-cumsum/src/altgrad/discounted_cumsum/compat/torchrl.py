r"""Drop-in replacements for TorchRL's functional value estimators (``torchrl.objectives.value.functional``).

Same names, argument order, defaults and outputs as TorchRL 0.14; each call is one pass of the fused kernel on the
CPU (see [`generalized_advantage_estimate`][altgrad.discounted_cumsum.generalized_advantage_estimate] for the
routes). Tensors are ``[*batch, time, *features]`` with time on ``time_dim`` (default -2, TorchRL's layout
``[*B, T, 1]``); ``gamma`` and ``lmbda`` are numbers or tensors that broadcast to the rewards, as in TorchRL.

Differences from TorchRL, all documented on the package page:

* ``terminated`` implies ``done`` (TorchRL's contract). Where an input breaks it (terminated but not done), every
  estimator here ends the episode at that step; TorchRL's GAE and TD(λ) would carry the next step's estimate across.
* The ``vec_*`` variants compute the exact values: TorchRL's drop the terms below γλ^k < 1e-7 (1e-5 relative).
* Refused with a ``ValueError`` naming the argument: ``rolling_gamma=False`` (a discount tied to the whole upcoming
  trajectory is not a scan), and ``rho_thresh`` / ``c_thresh`` that are not single numbers.
* Flags may be bool or numeric and broadcast to the rewards; values of different float dtypes are promoted.
"""

from __future__ import annotations

import torch

from .. import _rl

__all__ = [
    "generalized_advantage_estimate",
    "td0_advantage_estimate",
    "td0_return_estimate",
    "td1_advantage_estimate",
    "td1_return_estimate",
    "td_lambda_advantage_estimate",
    "td_lambda_return_estimate",
    "vec_generalized_advantage_estimate",
    "vec_td1_advantage_estimate",
    "vec_td1_return_estimate",
    "vec_td_lambda_advantage_estimate",
    "vec_td_lambda_return_estimate",
    "vtrace_advantage_estimate",
]

_NAMES = {
    "reward": "reward",
    "value": "state_value",
    "next_value": "next_state_value",
    "gamma": "gamma",
    "lam": "lmbda",
    "done": "done",
    "terminated": "terminated",
}


def _broadcasting(v, reward):
    """TorchRL broadcasts a tensor gamma/lmbda against the rewards: pad it to their rank (never read per row)."""
    if isinstance(v, torch.Tensor) and isinstance(reward, torch.Tensor) and 0 < v.dim() < reward.dim():
        return v.reshape((1,) * (reward.dim() - v.dim()) + tuple(v.shape))
    return v


def _rolling(rolling_gamma) -> None:
    if rolling_gamma is not None and rolling_gamma is not True:
        raise ValueError(
            f"`rolling_gamma` must be None or True, got {rolling_gamma!r}: a discount tied to the whole upcoming "
            "trajectory (rolling_gamma=False) is not supported"
        )


def _time_dim(time_dim) -> int:
    if isinstance(time_dim, bool) or not isinstance(time_dim, int):
        raise TypeError(f"`time_dim` must be an int, got {type(time_dim).__name__}")
    return time_dim


def _estimate(mode, gamma, lmbda, state_value, next_state_value, reward, done, terminated, time_dim, **kw):
    if terminated is None:
        terminated = done
    return _rl.estimate(
        mode,
        reward,
        state_value,
        next_state_value,
        _broadcasting(gamma, reward),
        _broadcasting(lmbda, reward),
        done=done,
        terminated=terminated,
        dim=_time_dim(time_dim),
        names=_NAMES,
        **kw,
    )


def generalized_advantage_estimate(
    gamma: float | torch.Tensor,
    lmbda: float | torch.Tensor,
    state_value: torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
    *,
    time_dim: int = -2,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""GAE, as TorchRL's: $A_t = \delta_t + \gamma\lambda (1 - d_t) A_{t+1}$, returns ``(advantage, value_target)``.

    $\delta_t = r_t + \gamma (1 - \mathrm{terminated}_t) V'_t - V_t$ and ``value_target = advantage + state_value``.

    Args:
        gamma: Discount, a number or a tensor broadcastable to ``reward``.
        lmbda: GAE $\lambda$, a number or a tensor broadcastable to ``reward``.
        state_value: $V_t$, shaped like ``reward``.
        next_state_value: $V'_t$, the value of the state after step $t$, shaped like ``reward``.
        reward: Rewards ``[*B, T, *F]``.
        done: Episode ends (trajectory boundaries), broadcastable to ``reward``.
        terminated: Terminal steps (no bootstrap); ``done`` when None.
        time_dim: The time dimension.

    Returns:
        ``(advantage, value_target)``, shaped like ``reward``.

    Raises:
        TypeError: If a tensor argument has the wrong type or dtype.
        ValueError: If shapes do not match or an argument is not supported.
    """
    return _estimate(_rl.GAE, gamma, lmbda, state_value, next_state_value, reward, done, terminated, time_dim)


def vec_generalized_advantage_estimate(
    gamma: float | torch.Tensor,
    lmbda: float | torch.Tensor,
    state_value: torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
    *,
    time_dim: int = -2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TorchRL's vectorised GAE: here the same fused pass as ``generalized_advantage_estimate`` (exact values)."""
    return _estimate(_rl.GAE, gamma, lmbda, state_value, next_state_value, reward, done, terminated, time_dim)


def _td0(gamma, state_value, next_state_value, reward, terminated):
    """TD(0) has no recursion: ``r + γ V'`` where not terminated, else ``r`` (selected, so a terminal state's NaN
    value stays out). It is TD(λ) at λ = 0, which the fused kernel runs as one loop without a carried dependency."""
    if not isinstance(reward, torch.Tensor) or not reward.is_floating_point() or reward.dim() == 0:
        raise TypeError("`reward` must be a floating tensor with at least one dimension")
    if next_state_value is None:
        raise ValueError("`next_state_value` is required")
    g = _broadcasting(gamma, reward)
    # Any dim gives the same numbers at λ = 0; the last one longer than 1 gives the kernel whole contiguous rows
    # (TorchRL's [B, T, 1] on the last dim would be B * T rows of one step).
    dim = max([i for i, s in enumerate(reward.shape) if s > 1], default=reward.dim() - 1)
    ret, adv = _rl.estimate(
        _rl.TD_LAMBDA,
        reward,
        state_value,
        next_state_value,
        g,
        0.0,
        terminated=terminated,
        dim=dim,
        names=_NAMES,
        second=state_value is not None,
    )
    return ret if state_value is None else adv


def td0_return_estimate(
    gamma: float | torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    terminated: torch.Tensor | None = None,
    *,
    done: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""TD(0) return $r_t + \gamma (1 - \mathrm{terminated}_t) V'_t$ (``done`` is TorchRL's deprecated alias).

    Raises:
        ValueError: If neither ``terminated`` nor ``done`` is given, or shapes do not match.
    """
    if terminated is None:
        terminated = done
    if terminated is None:
        raise ValueError("`terminated` is required (or the deprecated `done`)")
    return _td0(gamma, None, next_state_value, reward, terminated)


def td0_advantage_estimate(
    gamma: float | torch.Tensor,
    state_value: torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""TD(0) advantage $r_t + \gamma (1 - \mathrm{terminated}_t) V'_t - V_t$ (``terminated`` defaults to ``done``)."""
    if terminated is None:
        terminated = done
    return _td0(gamma, state_value, next_state_value, reward, terminated)


def td1_return_estimate(
    gamma: float | torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
    rolling_gamma: bool | None = None,
    *,
    time_dim: int = -2,
) -> torch.Tensor:
    r"""TD(1) (Monte-Carlo, bootstrapped at episode ends) return: TD($\lambda$) with $\lambda = 1$.

    Raises:
        ValueError: If ``rolling_gamma`` is False, or shapes do not match.
    """
    return td_lambda_return_estimate(
        gamma, 1.0, next_state_value, reward, done, terminated, rolling_gamma, time_dim=time_dim
    )


def td1_advantage_estimate(
    gamma: float | torch.Tensor,
    state_value: torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
    rolling_gamma: bool | None = None,
    time_dim: int = -2,
) -> torch.Tensor:
    """TD(1) advantage: ``td1_return_estimate(...) - state_value``."""
    return td_lambda_advantage_estimate(
        gamma, 1.0, state_value, next_state_value, reward, done, terminated, rolling_gamma, time_dim
    )


def td_lambda_return_estimate(
    gamma: float | torch.Tensor,
    lmbda: float | torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
    rolling_gamma: bool | None = None,
    *,
    time_dim: int = -2,
) -> torch.Tensor:
    r"""TD($\lambda$) return, as TorchRL's recursion.

    $G_t = r_t + \gamma_t\,[(1-\lambda_t)\,\hat V_t + \lambda_t\,(\hat V_t \text{ if } d_t \text{ else } G_{t+1})]$,
    with $\hat V_t = (1 - \mathrm{terminated}_t) V'_t$ and the last step treated as an episode end.

    Args:
        gamma: Discount, a number or a tensor broadcastable to ``reward``.
        lmbda: $\lambda$, a number or a tensor broadcastable to ``reward``.
        next_state_value: $V'_t$, shaped like ``reward``.
        reward: Rewards ``[*B, T, *F]``.
        done: Episode ends, broadcastable to ``reward``.
        terminated: Terminal steps; ``done`` when None.
        rolling_gamma: None or True (each discount tied to its own step); False is refused.
        time_dim: The time dimension.

    Returns:
        The returns, shaped like ``reward``.

    Raises:
        ValueError: If ``rolling_gamma`` is False, or shapes do not match.
    """
    _rolling(rolling_gamma)
    out, _ = _estimate(
        _rl.TD_LAMBDA, gamma, lmbda, None, next_state_value, reward, done, terminated, time_dim
    )
    return out


def td_lambda_advantage_estimate(
    gamma: float | torch.Tensor,
    lmbda: float | torch.Tensor,
    state_value: torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
    rolling_gamma: bool | None = None,
    time_dim: int = -2,
) -> torch.Tensor:
    """TD(λ) advantage: ``td_lambda_return_estimate(...) - state_value``, in the same pass."""
    _rolling(rolling_gamma)
    _, adv = _estimate(
        _rl.TD_LAMBDA, gamma, lmbda, state_value, next_state_value, reward, done, terminated, time_dim
    )
    return adv


def vec_td1_return_estimate(
    gamma, next_state_value, reward, done, terminated=None, rolling_gamma=None, time_dim: int = -2
) -> torch.Tensor:
    """TorchRL's vectorised TD(1) return: the exact ``td1_return_estimate``."""
    return td1_return_estimate(
        gamma, next_state_value, reward, done, terminated, rolling_gamma, time_dim=time_dim
    )


def vec_td1_advantage_estimate(
    gamma,
    state_value,
    next_state_value,
    reward,
    done,
    terminated=None,
    rolling_gamma=None,
    time_dim: int = -2,
) -> torch.Tensor:
    """TorchRL's vectorised TD(1) advantage: the exact ``td1_advantage_estimate``."""
    return td1_advantage_estimate(
        gamma, state_value, next_state_value, reward, done, terminated, rolling_gamma, time_dim
    )


def vec_td_lambda_return_estimate(
    gamma, lmbda, next_state_value, reward, done, terminated=None, rolling_gamma=None, *, time_dim: int = -2
) -> torch.Tensor:
    """TorchRL's vectorised TD(λ) return: the exact ``td_lambda_return_estimate``."""
    return td_lambda_return_estimate(
        gamma, lmbda, next_state_value, reward, done, terminated, rolling_gamma, time_dim=time_dim
    )


def vec_td_lambda_advantage_estimate(
    gamma,
    lmbda,
    state_value,
    next_state_value,
    reward,
    done,
    terminated=None,
    rolling_gamma=None,
    time_dim: int = -2,
) -> torch.Tensor:
    """TorchRL's vectorised TD(λ) advantage: the exact ``td_lambda_advantage_estimate``."""
    return td_lambda_advantage_estimate(
        gamma, lmbda, state_value, next_state_value, reward, done, terminated, rolling_gamma, time_dim
    )


def vtrace_advantage_estimate(
    gamma: float | torch.Tensor,
    log_pi: torch.Tensor,
    log_mu: torch.Tensor,
    state_value: torch.Tensor,
    next_state_value: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    terminated: torch.Tensor | None = None,
    rho_thresh: float | torch.Tensor = 1.0,
    c_thresh: float | torch.Tensor = 1.0,
    time_dim: int = -2,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""V-trace targets (IMPALA, Espeholt et al. 2018), as TorchRL's; returns ``(advantage, vs)``.

    $\rho_t = e^{\log\pi_t - \log\mu_t}$ (TorchRL's order), clipped at ``rho_thresh`` for the TD errors and the
    advantage and at ``c_thresh`` for the traces; $v_s - V$ is the reverse scan of the clipped TD errors with gates
    $\gamma c_t$ (cut at episode ends), and the advantage bootstraps from $v_{s,t+1}$, or from $V'_t$ at an episode
    end. One fused pass on the CPU.

    Raises:
        ValueError: If ``rho_thresh`` or ``c_thresh`` is not a single number, or shapes do not match.
    """
    vs, adv = _estimate(
        _rl.VTRACE,
        gamma,
        None,
        state_value,
        next_state_value,
        reward,
        done,
        terminated,
        time_dim,
        log_pi=log_pi,
        log_mu=log_mu,
        rho_bar=rho_thresh,
        c_bar=c_thresh,
    )
    return adv, vs
