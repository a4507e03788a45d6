"""Batched control environments in pure torch, for the evolution-strategies example.

:class:`BatchedCartPole` is CartPole-v1 (Barto, Sutton and Anderson 1983) with exactly the dynamics, termination
rules, reward and time limit of Gymnasium's ``CartPole-v1``, vectorised over a batch of independent episodes so that
a whole ES population (every member, every evaluation episode) steps in a handful of tensor operations. It draws its
randomness from its own :class:`torch.Generator`, never from torch's global RNG.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BatchedCartPole"]


class BatchedCartPole:
    """``batch_size`` CartPole-v1 episodes stepped together.

    State per episode: cart position ``x``, cart velocity, pole angle ``theta`` (radians, 0 = upright) and pole
    angular velocity. Actions are 0 (push left) or 1 (push right) with a force of 10 N. An episode terminates when
    ``|x| > 2.4`` or ``|theta| > 12°`` and is truncated after :attr:`max_steps` = 500 steps. Every step taken while
    the episode is running earns reward 1 (including the terminating step, as in Gymnasium), so the return of an
    episode is its length and 500 is the maximum; CartPole-v1 counts as solved at a mean return of 475.

    Finished episodes stay finished: their state freezes and they earn reward 0 until :meth:`reset`.

    Args:
        batch_size: number of independent episodes.
        seed: seed of the environment's private generator (initial states).
        dtype: floating dtype of the state.
        device: device of the state tensors.
    """

    gravity = 9.8
    masscart = 1.0
    masspole = 0.1
    total_mass = masspole + masscart
    length = 0.5  # half the pole's length
    polemass_length = masspole * length
    force_mag = 10.0
    tau = 0.02  # seconds between state updates (explicit Euler)
    theta_threshold = 12 * 2 * math.pi / 360
    x_threshold = 2.4
    max_steps = 500
    solved_return = 475.0
    observation_size = 4
    num_actions = 2

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.state = torch.zeros(self.batch_size, 4, dtype=dtype, device=self.device)
        self.alive = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        self.steps = 0

    def reset(self) -> torch.Tensor:
        """Start new episodes from states drawn uniformly in [-0.05, 0.05]^4; returns the observations ``(B, 4)``."""
        self.state = (
            torch.rand(self.batch_size, 4, generator=self.generator, dtype=self.dtype, device=self.device)
            * 0.1
            - 0.05
        )
        self.alive = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        self.steps = 0
        return self.state.clone()

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance every running episode by one step.

        Args:
            action: ``(B,)`` integer (or bool) tensor of 0/1 actions.

        Returns:
            ``(obs, reward, done)``: the new observations ``(B, 4)``, the rewards ``(B,)`` (1 for episodes that were
            running before this step, else 0) and ``(B,)`` bools that are true for episodes that have finished
            (terminated or reached the 500-step limit).
        """
        if action.shape != (self.batch_size,):
            raise ValueError(f"action must have shape ({self.batch_size},), got {tuple(action.shape)}")
        x, x_dot, theta, theta_dot = self.state.unbind(-1)
        force = torch.where(action.bool(), self.force_mag, -self.force_mag).to(self.dtype)
        costheta, sintheta = torch.cos(theta), torch.sin(theta)
        temp = (force + self.polemass_length * theta_dot.square() * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta.square() / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        new = torch.stack(
            (
                x + self.tau * x_dot,
                x_dot + self.tau * xacc,
                theta + self.tau * theta_dot,
                theta_dot + self.tau * thetaacc,
            ),
            dim=-1,
        )
        running = self.alive
        reward = running.to(self.dtype)
        self.state = torch.where(running.unsqueeze(-1), new, self.state)
        self.steps += 1
        terminated = (self.state[:, 0].abs() > self.x_threshold) | (
            self.state[:, 2].abs() > self.theta_threshold
        )
        self.alive = running & ~terminated
        if self.steps >= self.max_steps:
            self.alive = torch.zeros_like(self.alive)
        return self.state.clone(), reward, ~self.alive

    @property
    def all_done(self) -> bool:
        """True once every episode in the batch has finished."""
        return not bool(self.alive.any())
