"""A decoupled pipeline on digits: two processes, each stage updated at once from its own synthetic gradient.

The digits MLP of ``dni_digits.py`` (``Linear -> BatchNorm1d -> ReLU`` blocks of 128 units, then a classifier) is cut
in two with :func:`altgrad.dni.split_sequential`: stage 0 (the first block) runs in process 0, stage 1 (the second
block and the classifier) in process 1. :class:`altgrad.dni.DecoupledPipeline` steps stage 0 from its label-conditioned
synthesizer (cDNI) as soon as its activation exists, sends the activation on and goes to the next batch; the true
gradient comes back later and trains the synthesizer (``--staleness``: how many batches old it may be).

After training, rank 0 gathers both stages, measures the test accuracy and compares it with single-process cDNI
(:class:`altgrad.dni.DNI` with the interface at the same place, same steps and initial weights): the pipeline must come
within 2 points of it.

Run on CPU (gloo) or one GPU per process (nccl, chosen when CUDA is available)::

    torchrun --nproc-per-node 2 examples/dni_pipeline.py
    python examples/dni_pipeline.py          # starts the two processes itself (gloo, file:// rendezvous)

Options: ``--epochs``, ``--staleness``, ``--quick``, ``--synthetic-inputs`` (forward unlocking: stage 1 runs on its
input predicted from the image and label, and the single-process run is ``DNI(..., synthetic_inputs=True)``; its
20-epoch result against the 2-point target has not been measured yet).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Digits, load_digits, print_table, seed_everything

from altgrad.dni import DNI, DecoupledPipeline, LinearDNI, split_sequential

BATCH, WIDTH, LR, SG_LR = 64, 128, 1e-3, 1e-3
TOLERANCE = 0.02  # the pipeline's test accuracy must be within 2 points of single-process cDNI


def make_mlp(seed: int = 0) -> nn.Sequential:
    """``64 -> 128 -> 128 -> 10``: two ``Linear -> BatchNorm1d -> ReLU`` blocks and a linear classifier."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU()),
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)),
    )


def digits(seed: int) -> Digits:
    """The digits split of ``dni_digits.py``, standardised with the training statistics."""
    data = load_digits(seed=seed)
    mean, std = data.x_train.mean(0), data.x_train.std(0) + 0.1
    return Digits((data.x_train - mean) / std, data.y_train, (data.x_test - mean) / std, data.y_test)


def batches(data: Digits, epochs: int, seed: int):
    """The same mini-batches on every rank (and for the single-process run): a seeded order per epoch."""
    gen = seed_everything(seed)
    n = len(data.x_train)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - BATCH + 1, BATCH):  # drop the last partial batch (BatchNorm)
            idx = order[start : start + BATCH]
            yield data.x_train[idx], data.y_train[idx]


@torch.no_grad()
def accuracy(net: nn.Module, data: Digits) -> float:
    net.eval()
    acc = (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
    net.train()
    return acc


def single_process(
    data: Digits, epochs: int, seed: int, synthetic_inputs: bool = False
) -> tuple[float, float]:
    """Single-process cDNI with the interface at the pipeline's cut: (test accuracy, samples/s)."""
    net = make_mlp(seed)
    dni = DNI(
        net,
        modules=["0"],
        hidden_size=WIDTH,
        dni_network=LinearDNI,
        dni_params={"num_layers": 0},  # cDNI: a linear synthesizer of (h, one-hot label), as in the paper
        optim="adam",
        lr=LR,
        grad_optim="adam",
        grad_lr=SG_LR,
        context_size=10,
        synthetic_inputs=synthetic_inputs,
    )
    head = torch.optim.Adam(net[1].parameters(), lr=LR, fused=True)  # the kernel the pipeline's "adam" runs
    samples, start = 0, time.perf_counter()
    for x, y in batches(data, epochs, seed):
        head.zero_grad(set_to_none=True)
        F.cross_entropy(dni(x, context=y), y).backward()
        head.step()
        samples += len(x)
    return accuracy(net, data), samples / (time.perf_counter() - start)


def worker(
    rank: int,
    world: int,
    init: str,
    epochs: int,
    staleness: int,
    seed: int,
    out: str | None,
    synthetic_inputs: bool = False,
) -> dict:
    """One rank: its stage of the pipeline; rank 0 then evaluates and compares with single-process cDNI."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(
        backend, init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5)
    )
    torch.set_num_threads(1)  # one core per stage
    if world != 2:
        raise SystemExit(f"this example has 2 stages: run it with 2 processes, got {world}")
    data = digits(seed)
    pipe = DecoupledPipeline(
        split_sequential(make_mlp(seed), [1]),
        F.cross_entropy,
        "adam",
        lr=LR,
        hidden_size=WIDTH,
        dni_network=LinearDNI,
        dni_params={"num_layers": 0},
        grad_optim="adam",
        grad_lr=SG_LR,
        context_size=10,
        staleness=staleness,
        synthetic_inputs=synthetic_inputs,
    )
    samples, losses = 0, []
    dist.barrier()
    start = time.perf_counter()
    for x, y in batches(data, epochs, seed):
        loss = pipe.step(x, y)
        if loss is not None:
            losses.append(float(loss))
        samples += len(x)
    pipe.flush()
    seconds = time.perf_counter() - start
    states = [None] * world if rank == 0 else None
    dist.gather_object({k: v.cpu() for k, v in pipe.module.state_dict().items()}, states, dst=0)
    result: dict = {}
    if rank == 0:
        net = make_mlp(seed)
        for stage, state in zip(split_sequential(net, [1]), states or [], strict=True):
            stage.load_state_dict(state)
        acc = accuracy(net, data)
        ref_acc, ref_rate = single_process(data, epochs, seed, synthetic_inputs)
        rate = samples / seconds
        passed = abs(acc - ref_acc) <= TOLERANCE and acc > 0.5
        print_table(
            f"Digits MLP, {epochs} epochs of batch {BATCH}: 2-stage pipeline (staleness {staleness}"
            f"{', synthetic inputs' if synthetic_inputs else ''}) vs one process",
            ["run", "test acc", "samples/s"],
            [
                ["pipeline, 2 processes", acc, rate],
                [f"single-process cDNI{', synthetic inputs' if synthetic_inputs else ''}", ref_acc, ref_rate],
            ],
        )
        result = {
            "name": "dni_pipeline",
            "test_acc": acc,
            "reference_acc": ref_acc,
            "samples_per_s": rate,
            "reference_samples_per_s": ref_rate,
            "passed": passed,
            "target": f"|acc - single-process cDNI| <= {TOLERANCE}",
            "summary": f"pipeline {acc:.3f} vs one process {ref_acc:.3f} test acc",
        }
        print(("PASSED: " if passed else "FAILED: ") + result["summary"], flush=True)
        if out:
            Path(out).write_text(json.dumps(result))
    dist.barrier()  # every rank is done with its exchanges before the group goes away
    pipe.close()
    dist.destroy_process_group()
    return result


def _spawned(
    rank: int, init: str, epochs: int, staleness: int, seed: int, out: str, synthetic_inputs: bool
) -> None:
    worker(rank, 2, init, epochs, staleness, seed, out, synthetic_inputs)


def main(argv: list[str] | None = None, quick: bool = False, seed: int = 0) -> dict:
    """Train under ``torchrun`` (one stage per process) or start the two processes itself."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 20)")
    parser.add_argument("--staleness", type=int, default=1, help="age bound of the synthesizers' targets")
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument(
        "--synthetic-inputs",
        action="store_true",
        help="forward unlocking: stage 1 runs on its input predicted from (x, y); compared with DNI(synthetic_inputs=True)",
    )
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if (quick or args.quick) else 20)
    if "RANK" in os.environ:  # torchrun
        return worker(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            "env://",
            epochs,
            args.staleness,
            args.seed,
            None,
            args.synthetic_inputs,
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(
            _spawned,
            args=(f"file://{tmp}/init", epochs, args.staleness, args.seed, out, args.synthetic_inputs),
            nprocs=2,
        )
        return json.loads(Path(out).read_text())


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("passed", True) else 1)
