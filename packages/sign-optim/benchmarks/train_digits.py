"""Training comparison on scikit-learn's digits: AddSign / PowerSign (with and without internal decays)
against SGD with momentum and Adam, on a small MLP.

Every optimizer gets a small learning-rate sweep; the best learning rate (lowest final training loss,
averaged over seeds) is reported and its loss curve plotted.

    python packages/sign-optim/benchmarks/train_digits.py --out train.json --plot train.png [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from altgrad.sign_optim import (
    AddSign,
    CosineInternalDecay,
    LinearInternalDecay,
    PowerSign,
    RestartCosineInternalDecay,
)

OptimizerFactory = Callable[[Any, float, int], torch.optim.Optimizer]


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8x8 digits as float32 features in [0, 1], split 80/20 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def optimizers(total_steps: int) -> dict[str, tuple[OptimizerFactory, list[float]]]:
    """name -> (factory(params, lr, total_steps), learning rates to sweep)."""
    sign_lrs = [0.03, 0.1, 0.3, 1.0]
    return {
        "SGD momentum 0.9": (lambda p, lr, T: torch.optim.SGD(p, lr=lr, momentum=0.9), [0.03, 0.1, 0.3]),
        "Adam": (lambda p, lr, T: torch.optim.Adam(p, lr=lr), [1e-3, 3e-3, 1e-2, 3e-2]),
        "AddSign": (lambda p, lr, T: AddSign(p, lr=lr), sign_lrs),
        "AddSign-ld": (
            lambda p, lr, T: AddSign(p, lr=lr, sign_internal_decay=LinearInternalDecay(T)),
            sign_lrs,
        ),
        "AddSign-restart_10": (
            lambda p, lr, T: AddSign(
                p, lr=lr, sign_internal_decay=RestartCosineInternalDecay(T, num_periods=10)
            ),
            sign_lrs,
        ),
        "PowerSign": (lambda p, lr, T: PowerSign(p, lr=lr), sign_lrs),
        "PowerSign-cd": (
            lambda p, lr, T: PowerSign(p, lr=lr, sign_internal_decay=CosineInternalDecay(T)),
            sign_lrs,
        ),
    }


def train(
    factory: OptimizerFactory,
    lr: float,
    data: tuple[torch.Tensor, ...],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    model = make_model(seed)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    opt = factory(model.parameters(), lr, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x_train))
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return {"train_loss": losses, "test_accuracy": accuracy}


def run(epochs: int, seeds: list[int], batch_size: int = 64) -> dict[str, Any]:
    """Sweep every optimizer's learning rates; return the best run per optimizer."""
    data = load_digits_tensors()
    total_steps = epochs * math.ceil(len(data[0]) / batch_size)
    results: dict[str, Any] = {}
    for name, (factory, lrs) in optimizers(total_steps).items():
        best = None
        sweep = []
        for lr in lrs:
            start = time.perf_counter()
            runs = [train(factory, lr, data, epochs=epochs, batch_size=batch_size, seed=s) for s in seeds]
            curve = [sum(r["train_loss"][e] for r in runs) / len(runs) for e in range(epochs)]
            acc = sum(r["test_accuracy"] for r in runs) / len(runs)
            print(
                f"  {name:<20} lr={lr:<7g} final train loss {curve[-1]:.4f}  test acc {acc:.4f}"
                f"  ({time.perf_counter() - start:.1f}s)",
                flush=True,
            )
            sweep.append({"lr": lr, "final_train_loss": curve[-1], "test_accuracy": acc})
            final = curve[-1] if math.isfinite(curve[-1]) else math.inf  # a diverged run never wins
            if best is None or final < best["final"]:
                best = {"lr": lr, "train_loss": curve, "test_accuracy": acc, "final": final}
        assert best is not None
        best.pop("final")
        results[name] = {**best, "sweep": sweep}
    return {
        "epochs": epochs,
        "seeds": seeds,
        "batch_size": batch_size,
        "model": "MLP 64-128-128-10",
        "runs": results,
    }


def plot(training: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in training["runs"].items():
        style = "-" if "Sign" in name else "--"
        ax.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], style, label=f"{name} (lr={r['lr']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training cross-entropy (mean over seeds)")
    ax.set_title(f"sklearn digits, {training['model']}, best lr per optimizer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(training: dict[str, Any]) -> None:
    print(f"\n{'optimizer':<20} {'best lr':>8} {'final train loss':>17} {'test acc':>9}")
    for name, r in training["runs"].items():
        print(f"{name:<20} {r['lr']:>8g} {r['train_loss'][-1]:>17.4f} {r['test_accuracy']:>9.4f}")
    print("\n" + markdown_table(training))


def markdown_table(training: dict[str, Any]) -> str:
    """The training results in Markdown."""
    lines = ["| optimizer | best lr | final train loss | test accuracy |", "|---|---:|---:|---:|"]
    for name, r in training["runs"].items():
        lines.append(f"| {name} | {r['lr']:g} | {r['train_loss'][-1]:.4f} | {r['test_accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--plot", help="write the loss curves as PNG to this path")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and one seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    training = run(epochs=5 if args.quick else 20, seeds=[0] if args.quick else [0, 1])
    print_table(training)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(training, f, indent=1)
    if args.plot:
        plot(training, args.plot)


if __name__ == "__main__":
    main()
