"""Evolution strategies solve CartPole-v1, composing three altgrad packages.

* ``altgrad.es_layers.perturb`` turns an ordinary policy MLP (``nn.Linear`` layers) into a population of perturbed
  policies: every member of the population (and every evaluation episode of every member) acts in one batched
  forward per time step, with antithetic pairs ``θ + E_k`` / ``θ - E_k``.
* The environment is :class:`envs.BatchedCartPole`, CartPole-v1's dynamics in pure torch, stepping all
  ``2 x episodes x directions`` episodes at once.
* ``altgrad.discounted_cumsum.discounted_returns`` turns each episode's reward sequence into returns; the return at
  ``t = 0`` is the member's fitness.
* Fitness is shaped with ``altgrad.es_layers.centered_ranks``, the estimate ``Σ_k w_k E_k`` is written into
  ``.grad`` by the perturbed model, and ``altgrad.sign_optim.AddSign`` takes the step.

CartPole-v1 counts as solved at a mean return of 475 (of at most 500): training stops when the unperturbed policy
averages at least 490 over a check batch of 64 episodes, then the mean over 100 fresh evaluation episodes is
reported and must reach 475.

Run ``python examples/es_cartpole.py`` (``--quick`` for the short version used by the tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, limit_threads, print_table, seed_everything
from envs import BatchedCartPole

from altgrad.discounted_cumsum import discounted_returns
from altgrad.es_layers import centered_ranks, perturb
from altgrad.sign_optim import AddSign

SOLVED = BatchedCartPole.solved_return  # 475


class ObservationScale(nn.Module):
    """Divide each observation by a fixed typical magnitude (x, x', θ, θ'), so that all four inputs matter."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([2.4, 2.0, 0.21, 2.0]))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The scaled observation."""
        return obs / self.scale


def make_policy(hidden: int = 16) -> nn.Module:
    """The policy: scaled observation (4) -> tanh hidden -> 2 action logits; the action is the argmax."""
    return nn.Sequential(ObservationScale(), nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))


@torch.no_grad()
def rollout(groups, seed: int, gamma: float = 1.0) -> list[torch.Tensor]:
    """Run CartPole episodes for several policies in one batched environment; return each group's returns.

    Args:
        groups: ``[(policy, num_episodes), ...]``; a policy is any callable ``obs (n, 4) -> logits (n, 2)`` (the
            perturbed population, the plain policy) and acts greedily. All groups step together, so evaluating
            the plain policy next to the population costs no extra environment steps.
        seed: seed of the initial states.
        gamma: discount of the returns (1: the episode length, CartPole's score).

    Returns:
        One ``(num_episodes,)`` tensor per group: the return at ``t = 0``. Rewards are collected as a ``(batch, T)``
        tensor with the episode ends as ``dones``, and the returns-to-go come from
        :func:`altgrad.discounted_cumsum.discounted_returns`.
    """
    sizes = [n for _, n in groups]
    env = BatchedCartPole(sum(sizes), seed=seed)
    obs = env.reset()
    rewards, dones = [], []
    while not env.all_done:
        chunks = obs.split(sizes)
        action = torch.cat([policy(o) for (policy, _), o in zip(groups, chunks)]).argmax(-1)
        obs, reward, done = env.step(action)
        rewards.append(reward)
        dones.append(done)
    rewards_t = torch.stack(rewards, dim=1)
    dones_t = torch.stack(dones, dim=1).to(rewards_t.dtype)
    returns = discounted_returns(rewards_t, gamma, dones=dones_t, dim=-1)
    return list(returns[:, 0].split(sizes))


def main(quick: bool = False, seed: int = 0, mode: str = "iid") -> dict:
    """Train the CartPole policy with ES (es-layers + discounted-cumsum + AddSign) and evaluate it.

    Args:
        quick: the short version for the integration tests: at most 12 generations (instead of 80), and the
            target is ``max(2 x initial return, 100)`` instead of the solved score.
        seed: seed of the policy initialisation, the ES noise and the environments.
        mode: es-layers perturbation mode passed to ``perturb``: ``"iid"`` (dense Gaussian noise, the default),
            ``"lowrank"``, ``"flipout"``, ``"permuted"`` or ``"sparse"``.

    Returns:
        ``{"name", "generations": [per-generation dicts], "initial_return", "final_return" (mean over 100
        evaluation episodes), "solved_at" (generation or None), "target", "passed", "seconds"}``.
        ``passed`` is true when the evaluation mean is at least 475 (full) or, in quick mode, when it is at least
        ``max(2 x initial return, 100)``.
    """
    with limit_threads():
        return _run(quick, seed, mode=mode)


def _run(
    quick: bool,
    seed: int,
    directions: int = 32,
    episodes: int = 2,
    sigma: float = 0.1,
    lr: float = 0.05,
    mode: str = "iid",
    stop_at: float = 490.0,
) -> dict:
    """The experiment behind :func:`main`; ``directions`` is the population size N (2N antithetic policies),
    ``episodes`` the episodes per policy and generation, ``stop_at`` the check-batch mean that ends training."""
    max_generations = 12 if quick else 80
    eval_episodes = 100
    seed_everything(seed)
    policy = make_policy()
    population = perturb(policy, directions, mode=mode, seed=seed, antithetic=True, noise_scale=sigma)
    opt = AddSign(policy.parameters(), lr=lr, beta=0.9)
    repeats = 2 * episodes  # repeats 0..E-1 use +E_k, repeats E..2E-1 use -E_k

    (initial_returns,) = rollout([(policy, eval_episodes)], seed=10**6 + seed)
    initial = initial_returns.mean().item()
    print(
        f"CartPole-v1 by ES: {directions} antithetic directions x {episodes} episodes = "
        f"{repeats * directions} episodes per generation; initial policy return {initial:.1f}",
        flush=True,
    )
    history = []
    solved_at = None
    with Timer() as timer:
        for gen in range(max_generations + 1):
            # One batched rollout: the 2N perturbed policies and 64 episodes of the current policy (after `gen`
            # updates), stepped together.
            population.set_noise()
            pop_size = repeats * directions
            returns, check_returns = rollout([(population, pop_size), (policy, 64)], seed * 100_003 + gen)
            check = check_returns.mean().item()
            history.append(
                {
                    "generation": gen,
                    "population_mean": returns.mean().item(),
                    "population_max": returns.max().item(),
                    "policy_return": check,
                    "seconds": timer.elapsed,
                }
            )
            print(
                f"gen {gen:3d}: policy return {check:6.1f}; population mean {returns.mean():6.1f} "
                f"max {returns.max():5.0f} ({history[-1]['seconds']:.1f} s)",
                flush=True,
            )
            if check >= stop_at:
                solved_at = gen
                break
            if gen == max_generations:
                break
            per_member = returns.view(2, episodes, directions).mean(1)  # (+E_k / -E_k, N)
            ranks = centered_ranks(per_member)  # shaped over all 2N policies
            weights = -(ranks[0] - ranks[1]) / (directions * sigma**2)  # minimise -return
            opt.zero_grad()
            population.set_grad(weights)  # .grad = Σ_k w_k E_k
            opt.step()
    (final,) = rollout([(policy, eval_episodes)], seed=2 * 10**6 + seed)
    final_mean = final.mean().item()
    quick_target = max(2 * initial, 100.0)
    passed = final_mean >= SOLVED if not quick else final_mean >= quick_target
    target = (
        f"mean return over {eval_episodes} evaluation episodes >= {SOLVED:.0f} (CartPole-v1 solved)"
        if not quick
        else f"mean evaluation return >= max(2 x initial, 100) = {quick_target:.1f}"
    )
    print_table(
        f"ES on CartPole-v1 (es-layers perturb mode={mode!r} + discounted-cumsum returns + AddSign)",
        ["updates", "episodes run", "initial return", "final return (100 ep.)", "min", "solved", "s"],
        [
            [
                history[-1]["generation"],
                len(history) * (repeats * directions + 64),
                initial,
                final_mean,
                final.min().item(),
                final_mean >= SOLVED,
                timer.seconds,
            ]
        ],
    )
    print(f"target: {target}: {'PASSED' if passed else 'FAILED'}", flush=True)
    return {
        "name": "es_cartpole",
        "generations": history,
        "initial_return": initial,
        "final_return": final_mean,
        "final_min": final.min().item(),
        "solved_at": solved_at,
        "target": target,
        "passed": passed,
        "summary": f"return {initial:.1f} -> {final_mean:.1f} after {history[-1]['generation']} generations",
        "seconds": timer.seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (as in the integration tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode", default="iid", help="es-layers perturbation mode (iid, lowrank, flipout, ...)"
    )
    args = parser.parse_args()
    result = main(quick=args.quick, seed=args.seed, mode=args.mode)
    sys.exit(0 if result["passed"] else 1)
