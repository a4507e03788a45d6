"""EvoTorch's PGPE drives es-layers' batched evaluation (ask/tell) on CartPole-v1.

PGPE (Sehnke et al. 2010) adapts a separate standard deviation for every parameter: the search distribution is
EvoTorch's, not es-layers' seeded noise. Each generation

1. EvoTorch's functional PGPE asks for a population of parameter vectors (symmetric pairs ``μ ± z``);
2. ``altgrad.es_layers.population`` evaluates all of them in one batched forward per time step: inside the block,
   member ``k`` of the perturbed policy acts with exactly the parameters PGPE asked for (as deltas from the center);
3. PGPE is told the fitness (mean return) and updates its center (ClipUp) and its standard deviations; the policy's
   parameters are set to the new center.

The environment is :class:`envs.BatchedCartPole` (CartPole-v1's dynamics in torch), the returns come from
``altgrad.discounted_cumsum`` (via ``es_cartpole.rollout``). Run ``python examples/es_evotorch_pgpe.py``
(``--quick`` for the short version used by the tests). Needs ``evotorch`` (``pip install evotorch``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, limit_threads, print_table, seed_everything
from envs import BatchedCartPole
from es_cartpole import make_policy, rollout

from altgrad.es_layers import deltas_from_vectors, perturb, perturbed_parameters, population

SOLVED = BatchedCartPole.solved_return  # 475


def main(quick: bool = False, seed: int = 0) -> dict:
    """Train the CartPole policy with EvoTorch's PGPE evaluated by es-layers, then evaluate it.

    Args:
        quick: the short version for the integration tests: at most 15 generations (instead of 60), and the target
            is ``max(2 x initial return, 100)`` instead of the solved score.
        seed: seed of the policy initialisation, PGPE's sampling and the environments.

    Returns:
        ``{"name", "generations", "initial_return", "final_return" (mean over 100 evaluation episodes),
        "solved_at", "target", "passed", "summary", "seconds"}``.
    """
    with limit_threads():
        return _run(quick, seed)


def _run(quick: bool, seed: int, popsize: int = 32, episodes: int = 2, stop_at: float = 490.0) -> dict:
    """The experiment behind :func:`main`: ``popsize`` PGPE solutions (16 symmetric pairs), ``episodes`` each."""
    from evotorch.algorithms.functional import pgpe, pgpe_ask, pgpe_tell

    max_generations = 15 if quick else 60
    seed_everything(seed)
    policy = make_policy()
    pm = perturb(policy, popsize, mode="iid", seed=seed)  # the mode only matters for es-layers' own noise
    params = perturbed_parameters(pm)
    state = pgpe(
        center_init=parameters_to_vector(params.values()).detach(),
        center_learning_rate=0.2,
        stdev_learning_rate=0.1,
        objective_sense="max",
        ranking_method="centered",
        optimizer="clipup",
        optimizer_config={"max_speed": 0.4},
        stdev_init=0.2,
        symmetric=True,
    )
    (initial_returns,) = rollout([(policy, 100)], seed=10**6 + seed)
    initial = initial_returns.mean().item()
    print(
        f"CartPole-v1 by EvoTorch's PGPE on es-layers' evaluation: {popsize} solutions x {episodes} episodes "
        f"per generation, {sum(p.numel() for p in params.values())} parameters; initial return {initial:.1f}",
        flush=True,
    )
    history = []
    solved_at = None
    with Timer() as timer:
        for gen in range(max_generations + 1):
            values = pgpe_ask(state, popsize=popsize)  # (popsize, D): the parameters PGPE wants evaluated
            with population(pm, deltas_from_vectors(pm, values)):
                # member k (every episode of it) acts with parameters values[k]; the center policy runs alongside
                returns, check_returns = rollout(
                    [(pm, episodes * popsize), (policy, 64)], seed=seed * 100_003 + gen
                )
            check = check_returns.mean().item()
            history.append(
                {
                    "generation": gen,
                    "population_mean": returns.mean().item(),
                    "population_max": returns.max().item(),
                    "policy_return": check,
                    "stdev_mean": state.stdev.mean().item(),
                    "seconds": timer.elapsed,
                }
            )
            print(
                f"gen {gen:3d}: center return {check:6.1f}; population mean {returns.mean():6.1f} "
                f"max {returns.max():5.0f}; mean σ {history[-1]['stdev_mean']:.3f} ({timer.elapsed:.1f} s)",
                flush=True,
            )
            if check >= stop_at:
                solved_at = gen
                break
            if gen == max_generations:
                break
            fitness = returns.view(episodes, popsize).mean(0)  # rows: member fastest
            state = pgpe_tell(state, values, fitness)
            with torch.no_grad():
                vector_to_parameters(state.optimizer_state.center.to(values.dtype), params.values())
    (final,) = rollout([(policy, 100)], seed=2 * 10**6 + seed)
    final_mean = final.mean().item()
    quick_target = max(2 * initial, 100.0)
    passed = final_mean >= SOLVED if not quick else final_mean >= quick_target
    target = (
        f"mean return over 100 evaluation episodes >= {SOLVED:.0f} (CartPole-v1 solved)"
        if not quick
        else f"mean evaluation return >= max(2 x initial, 100) = {quick_target:.1f}"
    )
    print_table(
        "EvoTorch PGPE on CartPole-v1, evaluated by es-layers (population of explicit parameter vectors)",
        ["updates", "episodes run", "initial return", "final return (100 ep.)", "min", "solved", "s"],
        [
            [
                history[-1]["generation"],
                len(history) * (episodes * popsize + 64),
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
        "name": "es_evotorch_pgpe",
        "generations": history,
        "initial_return": initial,
        "final_return": final_mean,
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
    args = parser.parse_args()
    result = main(quick=args.quick, seed=args.seed)
    sys.exit(0 if result["passed"] else 1)
