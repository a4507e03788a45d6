"""An independent float64 re-implementation (plain Python floats) against the optimizers.

Random gradient sequences, several param groups with different settings, parameters that skip steps
(``grad is None``), maximize and both kinds of weight decay, for both implementations (loop, foreach).
"""

import math
import random

import pytest
import torch

from altgrad.sign_optim import (
    AddSign,
    CosineInternalDecay,
    LinearInternalDecay,
    PowerSign,
    RestartCosineInternalDecay,
)


def _sign(x):
    return (x > 0) - (x < 0)


def _decay(spec, step):
    """TF's sign_decay.py formulas, written from the reference, not from the package."""
    if spec is None:
        return 1.0
    kind, T = spec[0], spec[1]
    s = min(step, T)
    if kind == "linear":
        return (T - s) / T
    if kind == "lambda":
        return 2 - step / float(T)
    periods, zero_after = spec[2], spec[3]
    if kind == "cosine":
        fraction = 2.0 * periods * s / T
        value = 0.5 * (1 + math.cos(math.pi * fraction))
        return 0.0 if zero_after is not None and fraction >= 2 * zero_after else value
    value = 0.5 * (1 + math.cos(math.pi * ((periods * s) % T) / T))
    return 0.0 if zero_after is not None and periods * s / T >= zero_after else value


def _make_decay(spec):
    if spec is None:
        return None
    kind, T = spec[0], spec[1]
    if kind == "linear":
        return LinearInternalDecay(T)
    if kind == "lambda":
        return lambda x: 2 - x / float(T)
    cls = CosineInternalDecay if kind == "cosine" else RestartCosineInternalDecay
    return cls(T, num_periods=spec[2], zero_after=spec[3])


class Reference:
    """Per-parameter state: a flat list of Python floats for p and m, an int step."""

    def __init__(self, rule, values, lr, beta, alpha, decay, wd=0.0, decoupled=False, maximize=False):
        self.rule, self.lr, self.beta, self.alpha, self.decay = rule, lr, beta, alpha, decay
        self.wd, self.decoupled, self.maximize = wd, decoupled, maximize
        self.p = list(values)
        self.m = [0.0] * len(values)
        self.t = 0

    def step(self, grad):
        self.t += 1
        d = _decay(self.decay, self.t - 1)
        for i, g in enumerate(grad):
            if self.maximize:
                g = -g
            if self.wd:
                if self.decoupled:
                    self.p[i] *= 1 - self.lr * self.wd
                else:
                    g = g + self.wd * self.p[i]
            self.m[i] = self.beta * self.m[i] + (1 - self.beta) * g
            s = _sign(g) * _sign(self.m[i])
            mult = self.alpha + d * s if self.rule == "add" else self.alpha ** (d * s)
            self.p[i] = self.p[i] - self.lr * mult * g


GROUPS = [
    {"lr": 0.05, "beta": 0.9, "alpha": 1.0, "decay": None},
    {"lr": 0.02, "beta": 0.5, "alpha": 0.3, "decay": ("linear", 12)},
    {"lr": 0.01, "beta": 0.0, "alpha": 2.0, "decay": ("cosine", 10, 2, 1.5), "wd": 0.1},
    {"lr": 0.03, "beta": 0.99, "alpha": 1.5, "decay": ("restart", 9, 3, None), "wd": 0.05, "decoupled": True},
    {"lr": 0.01, "beta": 0.8, "alpha": 3.0, "decay": ("lambda", 20), "maximize": True},
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("cls", "rule"), [(AddSign, "add"), (PowerSign, "power")])
def test_matches_float64_reference(cls, rule, foreach):
    rng = random.Random(1234)
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (), (2, 3, 2)]
    groups, refs = [], []
    for cfg in GROUPS:
        alpha = cfg["alpha"] if rule == "add" else 1.0 + cfg["alpha"]
        params = []
        for shape in shapes:
            p = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            params.append(p)
            refs.append(
                (
                    p,
                    Reference(
                        rule,
                        p.detach().flatten().tolist(),
                        cfg["lr"],
                        cfg["beta"],
                        alpha,
                        cfg["decay"],
                        cfg.get("wd", 0.0),
                        cfg.get("decoupled", False),
                        cfg.get("maximize", False),
                    ),
                )
            )
        groups.append(
            {
                "params": params,
                "lr": cfg["lr"],
                "beta": cfg["beta"],
                "alpha": alpha,
                "sign_internal_decay": _make_decay(cfg["decay"]),
                "weight_decay": cfg.get("wd", 0.0),
                "decoupled_weight_decay": cfg.get("decoupled", False),
                "maximize": cfg.get("maximize", False),
            }
        )
    opt = cls(groups, foreach=foreach)
    for _ in range(25):
        for p, ref in refs:
            if rng.random() < 0.25:  # this parameter skips the step
                p.grad = None
                continue
            g = torch.randn(p.shape, dtype=torch.float64)
            # Exact zeros exercise sign(0) = 0.
            g[torch.rand(p.shape) < 0.1] = 0.0
            p.grad = g
            ref.step(g.flatten().tolist())
        opt.step()
    for p, ref in refs:
        torch.testing.assert_close(
            p.detach().flatten(), torch.tensor(ref.p, dtype=torch.float64), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            opt.state[p]["exp_avg"].flatten(),
            torch.tensor(ref.m, dtype=torch.float64),
            rtol=1e-12,
            atol=1e-12,
        )
        assert opt.state[p]["step"].item() == ref.t  # exact: integer-valued step counter
