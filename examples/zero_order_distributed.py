"""Zero-order training sharded over processes: every rank evaluates its block of the population.

A digits MLP (64 -> 64 -> 10) is a :class:`altgrad.zero_order.ZeroOrderGradientModule` with antithetic Gaussian
directions from a seeded distribution (:class:`altgrad.zero_order.SeededNormal`). With ``process_group=``, each
rank evaluates a contiguous block of the N directions, only the 2N loss values are all-gathered, and every rank
regenerates all directions from the seed and applies the same update, so the replicas never diverge and no
parameter or gradient is communicated.

Run on CPU (gloo) or one GPU per process (nccl, chosen when CUDA is available)::

    torchrun --nproc-per-node 2 examples/zero_order_distributed.py
    python examples/zero_order_distributed.py            # one process, the same estimate without a group

Options: ``--steps``, ``--num-samples``, ``--batch-size``, ``--quick``. Rank 0 prints the loss, the test accuracy and
the time per step, and the script checks that all ranks hold identical parameters at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_digits

import altgrad.zero_order as zo


class ZeroOrderMLP(zo.ZeroOrderGradientModule, method="antithetic", num_samples=200, sigma=0.05):
    """A digits classifier whose ``forward(x, y)`` returns the cross-entropy; gradients are zero-order."""

    def __init__(self, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same initialisation on every rank
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.noise = zo.SeededNormal(seed + 1)  # regenerable on every rank

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        return F.cross_entropy(self.net(x), y)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Not used (the seeded distribution below is); required by the abstract base class."""
        return torch.randn(sample_shape)

    def zero_order_distribution(self) -> zo.SeededNormal:
        """The seeded directions every rank regenerates identically."""
        return self.noise


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="30 steps")
    args = parser.parse_args(argv)
    steps = 30 if args.quick else args.steps

    launched = "WORLD_SIZE" in os.environ
    if launched:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        group = dist.group.WORLD
    else:
        rank, world, device, group = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None

    # The class keyword needs the group, which exists only now: configure a subclass.
    cls = type("Sharded", (ZeroOrderMLP,), {}, num_samples=args.num_samples, process_group=group)
    model = cls().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    data = load_digits()
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    gen = torch.Generator().manual_seed(0)  # the same batches on every rank

    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen).to(device)
        opt.zero_grad()
        loss = model(x_train[idx], y_train[idx])
        loss.backward()  # each rank: its block of the 2N evaluations, then the full gradient
        opt.step()
        if rank == 0 and (step % max(1, steps // 5) == 0 or step == steps):
            print(f"step {step:4d}/{steps}: loss {loss.item():.3f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    with torch.no_grad():
        acc = (model.net(data.x_test.to(device)).argmax(1) == data.y_test.to(device)).float().mean().item()
    identical = True
    if group is not None:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        copies = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(copies, flat)
        identical = all(torch.equal(c, copies[0]) for c in copies)
    result = {
        "ranks": world,
        "steps": steps,
        "ms_per_step": 1e3 * seconds / steps,
        "test_acc": acc,
        "identical_replicas": identical,
    }
    if rank == 0:
        print(
            f"{world} rank(s): {result['ms_per_step']:.1f} ms/step, test accuracy {acc:.3f}, "
            f"replicas identical: {identical}",
            flush=True,
        )
    if group is not None:
        dist.barrier()  # leave together: tearing gloo down while a peer still finishes its last exchange can abort
        dist.destroy_process_group()
    if not identical:
        raise SystemExit("replicas diverged")
    return result


if __name__ == "__main__":
    main()
