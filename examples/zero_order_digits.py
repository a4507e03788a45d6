"""Zero-order training of a digits classifier, compared with backprop.

An MLP (64 -> 32 -> 10) classifies sklearn's 8x8 digits. Its gradient is never computed by autograd: the model is a
:class:`altgrad.zero_order.ZeroOrderGradientModule` (antithetic Gaussian ES, ``num_samples`` directions, the
population evaluated in batched calls), so ``loss.backward()`` writes an estimate built from loss *values* only.
:class:`altgrad.sign_optim.PowerSign` takes the steps. The same network trained with backprop + Adam for the same
number of steps is the reference.

Run ``python examples/zero_order_digits.py`` (``--quick`` for the short version used by the tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Digits, Timer, limit_threads, load_digits, print_table, seed_everything

from altgrad.sign_optim import PowerSign
from altgrad.zero_order import ZeroOrderGradientModule

#: Targets of the full run (chance is 0.10).
TARGET_ZERO_ORDER_ACC = 0.85
TARGET_BACKPROP_ACC = 0.94


class MLP(nn.Module):
    """The classifier shared by both trainings: 64 -> hidden -> 10 with tanh."""

    def __init__(self, num_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.fc2(torch.tanh(self.fc1(x)))


def make_zero_order_model(num_samples: int, sigma: float, seed: int, hidden: int = 32) -> nn.Module:
    """An :class:`MLP` inside a ``ZeroOrderGradientModule`` whose forward returns the cross-entropy loss.

    The class keywords (``method``, ``num_samples``, ``sigma``) configure the estimator; ``sample`` draws the
    Gaussian directions from the model's own generator, so torch's global RNG is not touched.
    """

    class ZeroOrderMLP(ZeroOrderGradientModule, method="antithetic", num_samples=num_samples, sigma=sigma):
        def __init__(self) -> None:
            super().__init__()
            self.net = MLP(hidden=hidden)
            self.generator = torch.Generator().manual_seed(seed + 12345)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """The objective: mean cross-entropy of the batch (a scalar, as the zero-order API requires)."""
            return F.cross_entropy(self.net(x), y)

        def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
            """Standard normal directions of ``sample_shape`` from the model's own generator."""
            return torch.randn(sample_shape, generator=self.generator)

    return ZeroOrderMLP()


@torch.no_grad()
def evaluate(net: nn.Module, data: Digits) -> tuple[float, float, float]:
    """(train loss, train accuracy, test accuracy) of the classifier ``net``."""
    logits = net(data.x_train)
    loss = F.cross_entropy(logits, data.y_train).item()
    train_acc = (logits.argmax(1) == data.y_train).float().mean().item()
    test_acc = (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return loss, train_acc, test_acc


def train(
    kind: str,
    data: Digits,
    steps: int,
    batch_size: int,
    seed: int,
    num_samples: int,
    sigma: float,
    log_every: int,
) -> dict:
    """Train one model (``kind`` is ``"zero-order"`` or ``"backprop"``) and return its curve and final metrics."""
    gen = seed_everything(seed)
    if kind == "zero-order":
        model = make_zero_order_model(num_samples, sigma, seed)
        classifier = model.net
        opt = PowerSign(model.parameters(), lr=0.01, beta=0.9)
        evals_per_step = 2 * num_samples + 1
    elif kind == "backprop":
        model = classifier = MLP()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        evals_per_step = 1
    else:
        raise ValueError(f"kind must be 'zero-order' or 'backprop', got {kind!r}")
    loss0, _, acc0 = evaluate(classifier, data)
    curve = [(0, loss0, acc0)]
    print(f"[{kind}] step {0:4d}/{steps}: train loss {loss0:.3f}, test acc {acc0:.3f}", flush=True)
    with Timer() as timer:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(data.x_train), (batch_size,), generator=gen)
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad()
            if kind == "zero-order":
                loss = model(x, y)  # the unperturbed loss; backward runs the zero-order estimate
            else:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == steps:
                tl, _, ta = evaluate(classifier, data)
                curve.append((step, tl, ta))
                print(
                    f"[{kind}] step {step:4d}/{steps}: train loss {tl:.3f}, test acc {ta:.3f} "
                    f"({timer.elapsed:.1f} s)",
                    flush=True,
                )
    loss, train_acc, test_acc = evaluate(classifier, data)
    return {
        "method": kind,
        "optimizer": "PowerSign" if kind == "zero-order" else "Adam",
        "gradient": f"antithetic ES, N={num_samples}, σ={sigma}" if kind == "zero-order" else "autograd",
        "steps": steps,
        "forward_evals_per_step": evals_per_step,
        "initial_loss": loss0,
        "final_loss": loss,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "seconds": timer.seconds,
        "curve": curve,
    }


def main(quick: bool = False, seed: int = 0) -> dict:
    """Train the digits MLP with zero-order gradients + PowerSign and with backprop + Adam; return the results.

    Args:
        quick: the short version for the integration tests (fewer steps, lower targets).
        seed: seed of the initialisation, the data order and the ES noise.

    Returns:
        ``{"name", "runs": [per-method dicts], "target", "passed", "seconds"}``. ``passed`` is true when the
        zero-order model reaches the target test accuracy (0.85 full / 0.5 quick; chance is 0.1) and backprop
        reaches 0.94 full / 0.8 quick.
    """
    with limit_threads():
        return _run(quick, seed)


def _run(quick: bool, seed: int) -> dict:
    steps = 150 if quick else 800
    num_samples = 50
    sigma = 0.05
    batch_size = 256
    data = load_digits(seed=seed)
    print(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test images; {steps} steps of batch {batch_size}",
        flush=True,
    )
    with Timer() as timer:
        runs = [
            train("zero-order", data, steps, batch_size, seed, num_samples, sigma, log_every=steps // 10),
            train("backprop", data, steps, batch_size, seed, num_samples, sigma, log_every=steps // 10),
        ]
    zo_target = 0.5 if quick else TARGET_ZERO_ORDER_ACC
    bp_target = 0.8 if quick else TARGET_BACKPROP_ACC
    passed = runs[0]["test_acc"] >= zo_target and runs[1]["test_acc"] >= bp_target
    print_table(
        "Zero-order (PowerSign) vs backprop (Adam) on digits",
        [
            "method",
            "gradient",
            "optimizer",
            "steps",
            "f evals/step",
            "loss start",
            "loss end",
            "test acc",
            "s",
        ],
        [
            [
                r["method"],
                r["gradient"],
                r["optimizer"],
                r["steps"],
                r["forward_evals_per_step"],
                r["initial_loss"],
                r["final_loss"],
                r["test_acc"],
                r["seconds"],
            ]
            for r in runs
        ],
    )
    target = f"zero-order test acc >= {zo_target:.2f}, backprop >= {bp_target:.2f} (chance 0.10)"
    print(f"target: {target}: {'PASSED' if passed else 'FAILED'}", flush=True)
    return {
        "name": "zero_order_digits",
        "runs": runs,
        "target": target,
        "passed": passed,
        "summary": f"zero-order {runs[0]['test_acc']:.3f} vs backprop {runs[1]['test_acc']:.3f} test acc",
        "seconds": timer.seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (as in the integration tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = main(quick=args.quick, seed=args.seed)
    sys.exit(0 if result["passed"] else 1)
