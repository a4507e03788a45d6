"""End-to-end example: train an MLP on scikit-learn's digits with evolution strategies only (no backprop).

The whole population (``--population`` members, antithetic pairs) is evaluated in one batched forward per step
through layers converted by :func:`altgrad.es_layers.perturb`; the fitness of a member is its mean cross-entropy
on a shared minibatch; weights are centered ranks of the antithetic differences; Adam takes the step from
``.grad``. With the defaults (low-rank r=4, N=256, 300 steps) the test accuracy reaches about 0.93 on a 2-core CPU
in well under a minute (``--mode flipout`` / ``iid`` / ``permuted`` work too).

Usage::

    python packages/es-layers/benchmarks/digits_es.py [--mode lowrank] [--steps 300] [--population 256]

Needs scikit-learn (the digits data ship with it, nothing is downloaded).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

import altgrad.es_layers as es

log = logging.getLogger("digits_es")


def load_digits_tensors(seed: int = 0):
    """Digits as float tensors, scaled to [0, 1], split 75/25 into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    as_t = torch.as_tensor
    return as_t(x_tr, dtype=torch.float32), as_t(y_tr), as_t(x_te, dtype=torch.float32), as_t(y_te)


def train(
    mode: str = "lowrank",
    steps: int = 300,
    population: int = 256,
    minibatch: int = 32,
    sigma: float = 0.05,
    lr: float = 0.03,
    seed: int = 0,
    log_every: int = 25,
    **options,
) -> dict:
    """Train with ES and return the final accuracies and timing.

    Args:
        mode: Perturbation mode of :func:`altgrad.es_layers.perturb`.
        steps: ES steps.
        population: Number of directions (each evaluated with +E and -E).
        minibatch: Examples per step, shared by all members.
        sigma: Noise scale.
        lr: Adam learning rate.
        seed: Seed of the model initialisation, the minibatches and the noise.
        log_every: Log a line every this many steps.
        **options: Extra layer options (for example ``rank=4``).

    Returns:
        A dict with ``train_accuracy``, ``test_accuracy``, ``seconds`` and the settings.
    """
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    if mode == "lowrank":
        options.setdefault("rank", 4)
    pm = es.perturb(model, population, mode=mode, seed=seed, noise_scale=sigma, **options)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_tr), (minibatch,), generator=g)
        xb, yb = x_tr[idx], y_tr[idx]
        # rows: (repeat, member) with repeats = 2 * minibatch: example i with +E (first half) and -E (second half)
        x = xb.repeat(2, 1).repeat_interleave(population, dim=0)
        y = yb.repeat(2).repeat_interleave(population)
        pm.set_noise()
        with torch.no_grad():
            loss = F.cross_entropy(pm(x), y, reduction="none").view(2, minibatch, population).mean(1)
        weights = es.centered_ranks(es.antithetic_difference(loss.flatten())) / population
        opt.zero_grad()
        pm.set_grad(weights)
        opt.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                acc = (model(x_te).argmax(1) == y_te).float().mean().item()
            log.info("step %4d  mean loss %.4f  test accuracy %.4f", step, loss.mean().item(), acc)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_acc = (model(x_tr).argmax(1) == y_tr).float().mean().item()
        test_acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {
        "mode": mode,
        "population": population,
        "steps": steps,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "seconds": seconds,
        "options": options,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="lowrank", choices=sorted(es.MODES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--population", type=int, default=256)
    parser.add_argument("--minibatch", type=int, default=32)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(args.mode, args.steps, args.population, args.minibatch, args.sigma, args.lr, args.seed)
    print(
        f"{result['mode']}: test accuracy {result['test_accuracy']:.4f} "
        f"(train {result['train_accuracy']:.4f}) in {result['seconds']:.1f} s"
    )
    return result


if __name__ == "__main__":
    main()
