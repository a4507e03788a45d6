"""PPO's advantage step on a real gymnasium CartPole-v1 rollout: our fused estimators next to TorchRL's functions.

Eight ``gymnasium`` CartPole-v1 environments run in a ``SyncVectorEnv`` with a 40-step time limit, so the rollout
holds both kinds of episode end exactly as gymnasium reports them: ``terminated`` (the pole fell; no bootstrap) and
``truncated`` (the time limit; the step bootstraps from the value of the state it was cut at). The vector env resets
in the same step (``AutoresetMode.SAME_STEP``) and hands that cut-off state back in ``info["final_obs"]``, so each
step gets its own next value ``V(s_{t+1})``, never the reset state's. A tiny random-init MLP actor samples the
actions and a tiny MLP critic gives the values (nothing is trained: the step checked here is the estimator).

From the time-major ``[T, B]`` rollout it computes:

* GAE advantages with :func:`altgrad.discounted_cumsum.generalized_advantage_estimate` (``dones``, ``terminated``,
  ``next_values``, ``dim=0``; one pass of the fused kernel) and the value targets ``advantages + values``;
* TD(λ) returns with ``altgrad.discounted_cumsum.compat.torchrl.td_lambda_return_estimate``;

and the same numbers from ``torchrl.objectives.value.functional`` (its loop GAE, its vectorised GAE and its TD(λ)
return, on TorchRL's ``[B, T, 1]`` layout), then prints the largest differences and the timings.

Run ``python examples/rl_advantages_cartpole.py`` (``--quick`` for the short version used by the tests). Needs
``gymnasium`` and ``torchrl`` (``pip install gymnasium torchrl``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, limit_threads, print_table, seed_everything

from altgrad.discounted_cumsum import generalized_advantage_estimate
from altgrad.discounted_cumsum.compat import torchrl as ours_trl

GAMMA, LAM = 0.99, 0.95
NUM_ENVS = 8
#: The time limit: short, so that a few hundred steps hold many truncated episodes next to terminated ones.
MAX_EPISODE_STEPS = 40
EPS32 = torch.finfo(torch.float32).eps


def rollout(steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Collect ``steps`` steps of ``NUM_ENVS`` CartPole-v1 envs; tensors are time-major ``[T, B]`` float32/bool."""
    import gymnasium as gym

    envs = gym.make_vec(
        "CartPole-v1",
        num_envs=NUM_ENVS,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
        max_episode_steps=MAX_EPISODE_STEPS,
    )
    actor = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    critic = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    generator = torch.Generator().manual_seed(seed)
    obs, _ = envs.reset(seed=seed)
    obs = torch.as_tensor(obs)
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("values", "next_values", "rewards", "dones", "terminated")
    }
    with torch.no_grad():
        for _ in range(steps):
            probs = torch.softmax(actor(obs), dim=-1)
            action = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
            next_obs = torch.as_tensor(next_obs)
            # With SAME_STEP autoreset, next_obs of a finished env is already the reset state; the state the
            # episode ended in (needed to bootstrap a truncated step) is info["final_obs"].
            successor = next_obs.clone()
            if "_final_obs" in info:
                for i in info["_final_obs"].nonzero()[0]:
                    successor[i] = torch.as_tensor(info["final_obs"][i])
            out["values"].append(critic(obs).squeeze(-1))
            out["next_values"].append(critic(successor).squeeze(-1))
            out["rewards"].append(torch.as_tensor(reward, dtype=torch.float32))
            out["terminated"].append(torch.as_tensor(terminated))
            out["dones"].append(torch.as_tensor(terminated | truncated))
            obs = next_obs
    envs.close()
    return {k: torch.stack(v) for k, v in out.items()}


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in microseconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def main(quick: bool = False, seed: int = 0) -> dict:
    """Roll out CartPole, compute GAE and TD(λ) returns with ours and TorchRL's functions, compare them.

    Args:
        quick: the short version for the integration tests (256 steps instead of 512, fewer timing repeats).
        seed: seed of the policy/critic initialisation, the action sampling and the environments.

    Returns:
        ``{"name", "passed", "target", "summary", "steps", "episodes_terminated", "episodes_truncated",
        "max_diff", "bound", "timings_us", "seconds", "rollout", "advantages", "td_lambda_returns"}`` (the
        rollout's ``[T, B]`` tensors and ours). ``passed`` is true when every compared pair agrees within
        ``bound`` (per quantity) and the rollout holds both terminated and truncated episode ends.
    """
    from torchrl.objectives.value import functional as trl

    steps = 256 if quick else 512
    repeats = 20 if quick else 100
    with limit_threads():
        seed_everything(seed)
        with Timer() as timer:
            roll = rollout(steps, seed)
            r, v, nv = roll["rewards"], roll["values"], roll["next_values"]
            done, term = roll["dones"], roll["terminated"]

            # ours, time-major [T, B] (time on dim 0, CleanRL's layout)
            def ours_gae() -> torch.Tensor:
                return generalized_advantage_estimate(
                    r, v, GAMMA, LAM, dones=done, terminated=term, next_values=nv, dim=0
                )

            def ours_td_lambda() -> torch.Tensor:
                return ours_trl.td_lambda_return_estimate(GAMMA, LAM, nv, r, done, term, time_dim=0)

            # TorchRL's layout: [B, T, 1], time on dim -2
            bt = {k: x.T.unsqueeze(-1).contiguous() for k, x in roll.items()}

            def trl_gae() -> tuple[torch.Tensor, torch.Tensor]:
                return trl.generalized_advantage_estimate(
                    GAMMA, LAM, bt["values"], bt["next_values"], bt["rewards"], bt["dones"], bt["terminated"]
                )

            def trl_vec_gae() -> tuple[torch.Tensor, torch.Tensor]:
                return trl.vec_generalized_advantage_estimate(
                    GAMMA, LAM, bt["values"], bt["next_values"], bt["rewards"], bt["dones"], bt["terminated"]
                )

            def trl_td_lambda() -> torch.Tensor:
                return trl.td_lambda_return_estimate(
                    GAMMA, LAM, bt["next_values"], bt["rewards"], bt["dones"], bt["terminated"]
                )

            to_tm = lambda x: x.squeeze(-1).T  # noqa: E731  [B, T, 1] -> [T, B]
            adv = ours_gae()
            target = adv + v
            ref_adv, ref_target = (to_tm(x) for x in trl_gae())
            vec_adv, _ = (to_tm(x) for x in trl_vec_gae())
            ret = ours_td_lambda()
            ref_ret = to_tm(trl_td_lambda())
            timings = {
                "ours GAE": best_of(ours_gae, repeats),
                "TorchRL GAE (loop)": best_of(trl_gae, repeats),
                "TorchRL GAE (vec)": best_of(trl_vec_gae, repeats),
                "ours TD(λ) return": best_of(ours_td_lambda, repeats),
                "TorchRL TD(λ) return": best_of(trl_td_lambda, repeats),
            }

    # Bound: both sides see the same float32 inputs. TorchRL's recursions run in float32 (about 4 roundings per step:
    # forming δ or the bootstrap term, then the multiply-add of the carry, each <= eps32 relative), ours carries in
    # float64; a step's rounding error is damped by γλ per step back, so it adds up to at most
    # 4·eps32/(1 - γλ) ≈ 8e-6 of the largest magnitude in the recursion. TorchRL's vectorised GAE also drops the
    # terms with (γλ)^k < 1e-7 (documented), 1e-7/(1 - γλ) relative more. Margin 4x.
    def bound(ref: torch.Tensor, extra: float = 0.0) -> float:
        return 4 * (4 * EPS32 + extra) / (1 - GAMMA * LAM) * max(1.0, ref.abs().max().item())

    checks = {
        "GAE advantage vs TorchRL loop": ((adv - ref_adv).abs().max().item(), bound(ref_adv)),
        "value target vs TorchRL loop": ((target - ref_target).abs().max().item(), bound(ref_target)),
        "GAE advantage vs TorchRL vec": ((adv - vec_adv).abs().max().item(), bound(vec_adv, 1e-7)),
        "TD(λ) return vs TorchRL": ((ret - ref_ret).abs().max().item(), bound(ref_ret)),
    }
    # With per-step next values equal to the next step's value inside an episode, TD(λ) return = GAE + V exactly in
    # real arithmetic (two routes here, so again the bound above).
    checks["TD(λ) return vs GAE + V (ours)"] = ((ret - target).abs().max().item(), bound(target))
    n_term = int(term.sum())
    n_trunc = int((done & ~term).sum())
    agree = all(diff <= tol for diff, tol in checks.values())
    passed = agree and n_term > 0 and n_trunc > 0
    print_table(
        f"CartPole-v1 rollout: {steps} steps x {NUM_ENVS} envs, {n_term} terminated and {n_trunc} truncated "
        f"episode ends (γ = {GAMMA}, λ = {LAM}, float32)",
        ["comparison", "max |diff|", "bound", "within"],
        [[name, diff, tol, diff <= tol] for name, (diff, tol) in checks.items()],
    )
    fastest_trl = min(timings["TorchRL GAE (loop)"], timings["TorchRL GAE (vec)"])
    print_table(
        f"timings, best of {repeats}, 1 thread, [T, B] = [{steps}, {NUM_ENVS}]",
        ["estimator", "µs", "x ours"],
        [
            [name, t, t / timings["ours GAE" if "GAE" in name else "ours TD(λ) return"]]
            for name, t in timings.items()
        ],
    )
    summary = (
        f"GAE and TD(λ) on a {steps}x{NUM_ENVS} CartPole rollout ({n_term} terminated, {n_trunc} truncated) match "
        f"TorchRL to {max(d for d, _ in checks.values()):.1e}; ours GAE {timings['ours GAE']:.0f} µs vs TorchRL's "
        f"fastest {fastest_trl:.0f} µs"
    )
    print(summary)
    return {
        "name": "rl_advantages_cartpole",
        "passed": passed,
        "target": "GAE / TD(λ) agree with TorchRL within the float32 bound; both end kinds present",
        "summary": summary,
        "steps": steps,
        "episodes_terminated": n_term,
        "episodes_truncated": n_trunc,
        "max_diff": {name: diff for name, (diff, _) in checks.items()},
        "bound": {name: tol for name, (_, tol) in checks.items()},
        "timings_us": timings,
        "seconds": timer.seconds,
        "rollout": roll,
        "advantages": adv,
        "td_lambda_returns": ret,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short version used by the tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.exit(0 if main(quick=args.quick, seed=args.seed)["passed"] else 1)
