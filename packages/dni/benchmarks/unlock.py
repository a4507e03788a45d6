"""Complete unlock on digits: synthetic inputs and synthetic gradients vs backward-only DNI vs backprop.

sklearn's 8×8 digits (1437 train / 360 test, the MNIST stand-in of run.py). The network is the paper's FCN:
``layers − 1`` hidden blocks ``Linear(·, 256) → BatchNorm1d → ReLU`` and a Linear classifier, with an interface
after every hidden block (N layers → N − 1 interfaces):

* ``backprop``: no interface.
* ``dni`` / ``cdni``: :class:`~altgrad.dni.BackwardInterface` (update unlocking), synthesizer unconditioned /
  conditioned on the one-hot label.
* ``unlock`` / ``cunlock``: :class:`~altgrad.dni.BidirectionalInterface`: every block above the first runs on a
  synthetic input predicted from the image (forward unlocking) and every block is updated from a synthetic
  gradient: the complete unlock (paper §3.3). Testing uses the real activations (eval mode).

Synthesizers: ``LinearDNI`` with two hidden layers of 256 (forward and backward), as in dni-pytorch's
mnist-full-unlock example. One Adam (lr 1e-3) over everything, batch 64, same initial weights and batches for
every method.

Usage::

    python packages/dni/benchmarks/unlock.py --out docs/dni/unlock.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from altgrad.dni import BackwardInterface, BidirectionalInterface, LinearDNI

METHODS = ("backprop", "dni", "cdni", "unlock", "cunlock")


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    mean, std = x[360:].mean(0), x[360:].std(0) + 0.1
    x = (x - mean) / std
    return x[360:], y[360:], x[:360], y[:360]


class Net(nn.Module):
    def __init__(self, method: str, layers: int, width: int, sg_hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64 if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU())
            for i in range(layers - 1)
        )
        self.classifier = nn.Linear(width, 10)
        ctx = 10 if method.startswith("c") else 0
        self.method = method
        self.interfaces = nn.ModuleList()
        for _ in self.blocks:
            backward = LinearDNI(width + ctx, sg_hidden, width, num_layers=2)
            if method.endswith("unlock"):
                forward = LinearDNI(64 + ctx, sg_hidden, width, num_layers=2)
                self.interfaces.append(BidirectionalInterface(forward, backward, context_size=ctx))
            elif method != "backprop":
                self.interfaces.append(BackwardInterface(backward, context_size=ctx))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        ctx = y if self.method.startswith("c") and self.training else None
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.method.endswith("unlock"):
                h = self.interfaces[i](h, x, ctx)
            elif self.method != "backprop":
                h = self.interfaces[i](h, ctx)
        return self.classifier(h)


def run(layers: int, method: str, seed: int, steps: int, data, width: int, sg_hidden: int) -> float:
    xtr, ytr, xte, yte = data
    net = Net(method, layers, width, sg_hidden, seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        i = torch.randint(0, len(xtr), (64,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xtr[i], ytr[i]), ytr[i]).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return (net(xte).argmax(1) == yte).float().mean().item()


def merge(paths: list[str], out: str) -> None:
    """Combine split runs (``--depths``/``--seeds`` in several processes) into one result and print the table."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    result = {k: v for k, v in parts[0].items() if k not in ("accuracy", "seeds")}
    result["seeds"], result["accuracy"] = sorted({s for p in parts for s in p["seeds"]}), {}
    for part in parts:
        for layers, row in part["accuracy"].items():
            dest = result["accuracy"].setdefault(layers, {})
            for method, cell in row.items():
                d = dest.setdefault(method, {"per_seed": {}, "seconds": 0.0})
                d["per_seed"].update(
                    {str(s): a for s, a in zip(part["seeds"], cell["per_seed"], strict=True)}
                )
                d["seconds"] += cell["seconds"]
    print(f"{'layers':>6} " + " ".join(f"{m:>16}" for m in METHODS))
    for layers, row in sorted(result["accuracy"].items()):
        for cell in row.values():
            cell["mean"] = statistics.fmean(cell["per_seed"].values())
        print(f"{layers:>6} " + " ".join(f"{row[m]['mean']:>16.3f}" for m in METHODS))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="unlock.json")
    parser.add_argument("--quick", action="store_true", help="a smoke run (few steps, one seed)")
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 4], help="numbers of layers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="merge result files of split runs into --out"
    )
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(1)
    steps, seeds, depths = (100, [0], [3]) if args.quick else (2000, args.seeds, args.depths)
    data = load_digits_split()
    result = {
        "steps": steps,
        "seeds": seeds,
        "batch": 64,
        "width": 256,
        "sg_hidden": 256,
        "accuracy": {},
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(f"{'layers':>6} " + " ".join(f"{m:>16}" for m in METHODS))
    for layers in depths:
        row = {}
        for method in METHODS:
            t0 = time.perf_counter()
            accs = [run(layers, method, s, steps, data, 256, 256) for s in seeds]
            row[method] = {
                "mean": statistics.fmean(accs),
                "per_seed": accs,
                "seconds": time.perf_counter() - t0,
            }
        result["accuracy"][str(layers)] = row
        print(f"{layers:>6} " + " ".join(f"{row[m]['mean']:>16.3f}" for m in METHODS), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
