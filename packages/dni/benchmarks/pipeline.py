"""Benchmark: the decoupled pipeline against torch's pipeline schedules and single-process backprop (issue 25).

Same data (sklearn's digits, standardised), same samples, same initial weights for every method:

* ``backprop@T``: one process, plain backprop + Adam at ``T`` intra-op threads (1 and 2; the best counts);
* ``backprop_default@2``: the same with ``torch.optim.Adam``'s default implementation (on CPU a loop over the
  parameters), for reference: the baseline of the runs before 2026-12-07 (seventh session);
* ``cdni``: one process, :class:`altgrad.dni.DNI` with one interface at the pipeline's cut (accuracy reference);
* ``gpipe`` / ``1f1b``: ``torch.distributed.pipelining`` with the same 2 stages, 2 processes x 1 thread (gloo),
  ``ScheduleGPipe`` / ``Schedule1F1B`` with 4 micro-batches, Adam after each batch;
* ``dni_pipeline``: :class:`altgrad.dni.DecoupledPipeline`, 2 processes x 1 thread, cDNI, staleness 1, its
  messages over its default same-host transport (a Unix socket); ``dni_pipeline_gloo``: the same through gloo's
  ``isend`` / ``irecv`` (``transport="process_group"``).

Every other Adam here, the baselines' included, is torch's fused kernel (``fused=True``), the one the
pipeline's ``"adam"`` builds, and every method steps it as the pipeline does (``altgrad.dni._optim.update``: the
kernel called directly, without ``Adam.step``'s Python around it): the comparison is of schedules, not of
optimizer implementations (with the default implementation backprop runs at 0.66x to 0.90x of its speed here).

Models: the digits MLP (64-256-256-10, batch 64, cut after the first block) and a wide MLP (6 layers of width
1024, batch 256, cut after the third block). Each method runs ``--rounds`` times, the methods interleaved round
by round (the machine is shared); samples/s is the best round, accuracy the test accuracy after the fixed number
of samples (identical across rounds up to thread timing). Per-stage step times (ms) of the DNI pipeline are
recorded for the 4/8-stage model in the docs, measured in one process alone (``stage_compute_ms``) and beside a
second busy process (``stage_compute_loaded_ms``): the latter bounds what two stages can reach on this machine.

Usage::

    python packages/dni/benchmarks/pipeline.py --out docs/dni/pipeline.json --plot docs/dni/pipeline.png [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import load_digits_split

from altgrad.dni import DNI, DecoupledPipeline, LinearDNI, split_sequential
from altgrad.dni._links import GroupLink, SocketLink, connect_socket
from altgrad.dni._optim import update
from altgrad.dni.interface import run_backward

MODELS = {
    # name: (hidden blocks, width, batch, cut after this many blocks, samples)
    "digits": (2, 256, 64, 1, 64 * 400),
    "digits-b256": (2, 256, 256, 1, 256 * 100),  # the same MLP at the largest batch
    "wide": (5, 1024, 256, 3, 256 * 100),
}
LR, SG_LR = 1e-3, 1e-3
ADAM = {"fused": True}  # every method's Adam: the kernel DecoupledPipeline's "adam" runs


def make_mlp(blocks: int, width: int, seed: int = 0) -> nn.Sequential:
    """``blocks`` hidden ``Linear -> BatchNorm1d -> ReLU`` blocks and a linear classifier (one child each)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    fan_in = 64
    for _ in range(blocks):
        mods.append(nn.Sequential(nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU()))
        fan_in = width
    mods.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*mods)


def batches(model: str, seed: int = 0):
    _blocks, _width, batch, _cut, samples = MODELS[model]
    xtr, ytr, _, _ = load_digits_split()
    g = torch.Generator().manual_seed(seed)
    for _ in range(samples // batch):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        yield xtr[idx], ytr[idx]


@torch.no_grad()
def accuracy(net: nn.Module) -> float:
    _, _, xte, yte = load_digits_split()
    net.eval()
    return (net(xte).argmax(1) == yte).float().mean().item()


# --------------------------------------------------------------------------- one process


def single(model: str, method: str, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    blocks, width, batch, cut, samples = MODELS[model]
    net = make_mlp(blocks, width)
    if method == "cdni":
        names = [str(i) for i in range(cut)]
        dni = DNI(
            net,
            modules=[names[-1]],
            hidden_size=width,
            dni_network=LinearDNI,
            dni_params={"num_layers": 0},
            optim="adam",
            lr=LR,
            grad_optim="adam",
            grad_lr=SG_LR,
            context_size=10,
        )
        # The interface sits on the last block below the cut, which the wrapper steps at forward time; the blocks
        # before it (the wide MLP's first two) receive the same synthetic gradient through it and are stepped
        # here with the layers above the cut (which the loss trains): the pipeline's stage 0, in one process.
        opt = torch.optim.Adam(
            [p for i, m in enumerate(net) if i != cut - 1 for p in m.parameters()], lr=LR, **ADAM
        )
    else:  # backprop; backprop_default: torch.optim.Adam's default implementation
        opt = torch.optim.Adam(net.parameters(), lr=LR, **(ADAM if method == "backprop" else {}))
    data = list(batches(model))  # before the clock: loading digits (sklearn's import and CSV) takes seconds
    start = time.perf_counter()
    for x, y in data:
        out = dni(x, context=y) if method == "cdni" else net(x)
        F.cross_entropy(out, y).backward()
        update(opt)  # step and drop the gradients as the pipeline does (the default Adam: opt.step() itself)
    seconds = time.perf_counter() - start
    return {"samples_per_s": samples // batch * batch / seconds, "test_acc": accuracy(net)}


# --------------------------------------------------------------------------- two processes


def _stages(model: str) -> list[nn.Sequential]:
    blocks, width, _batch, cut, _samples = MODELS[model]
    return split_sequential(make_mlp(blocks, width), [cut])


def _join(rank: int, tmp: str) -> None:
    """This process as rank ``rank`` of a 2-rank gloo group (``file://`` rendezvous in ``tmp``), one thread."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/init",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(minutes=10),
    )
    torch.set_num_threads(1)


def _two_ranks(rank: int, tmp: str, model: str, method: str) -> None:
    _join(rank, tmp)
    _blocks, width, batch, _cut, samples = MODELS[model]
    stages = _stages(model)
    mine = stages[rank]
    step_ms: list[float] = []
    if method.startswith("dni_pipeline"):
        pipe = DecoupledPipeline(
            stages,
            F.cross_entropy,
            "adam",
            lr=LR,
            hidden_size=width,
            dni_network=LinearDNI,
            dni_params={"num_layers": 0},
            grad_optim="adam",
            grad_lr=SG_LR,
            context_size=10,
            staleness=1,
            transport="process_group" if method == "dni_pipeline_gloo" else "socket",
        )
        data = list(batches(model))
        dist.barrier()
        start = time.perf_counter()
        for x, y in data:
            t0 = time.perf_counter()
            pipe.step(x, y)
            step_ms.append((time.perf_counter() - t0) * 1e3)
        pipe.flush()
    else:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(mine, rank, 2, torch.device("cpu"))
        cls = ScheduleGPipe if method == "gpipe" else Schedule1F1B
        schedule = cls(stage, n_microbatches=4, loss_fn=F.cross_entropy)
        # The first step infers the stages' shapes by running the modules on uninitialised tensors, which writes
        # NaN into BatchNorm running statistics (test accuracy 0.10); an untimed first step, then the initial
        # state is restored.
        initial = {k: v.clone() for k, v in mine.state_dict().items()}
        x0, y0 = next(iter(batches(model)))
        if rank == 0:
            schedule.step(x0)
        else:
            schedule.step(target=y0, losses=[])
        mine.load_state_dict(initial)
        mine.zero_grad(set_to_none=True)
        opt = torch.optim.Adam(mine.parameters(), lr=LR, **ADAM)
        data = list(batches(model))
        dist.barrier()
        start = time.perf_counter()
        for x, y in data:
            if rank == 0:
                schedule.step(x)
            else:
                schedule.step(target=y, losses=[])
            update(opt)
    dist.barrier()
    seconds = time.perf_counter() - start
    states: list[Any] | None = [None, None] if rank == 0 else None
    dist.gather_object(mine.state_dict(), states, dst=0)
    if rank == 0:
        assert states is not None
        full = _stages(model)
        for part, state in zip(full, states, strict=True):
            part.load_state_dict(state)
        result = {
            "samples_per_s": samples // batch * batch / seconds,
            "test_acc": accuracy(nn.Sequential(*full)),
        }
        Path(tmp, "result.json").write_text(json.dumps(result))
    # median compute+wait time per step on this rank (the DNI pipeline's per-stage time)
    if step_ms:
        Path(tmp, f"stage{rank}.json").write_text(json.dumps(sorted(step_ms)[len(step_ms) // 2]))
    dist.barrier()
    dist.destroy_process_group()


def two(model: str, method: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_two_ranks, args=(tmp, model, method), nprocs=2)
        result = json.loads(Path(tmp, "result.json").read_text())
        if method.startswith("dni_pipeline"):
            result["stage_ms"] = [json.loads(Path(tmp, f"stage{r}.json").read_text()) for r in range(2)]
        return result


def _stage_steps(model: str) -> list[Any]:
    """One DNI pipeline step of each stage, written out (no communication): ``[first, second]``.

    The optimizer updates and the backward passes the pipeline makes itself go through the package's own calls
    (``update``, ``run_backward``), as in :class:`~altgrad.dni.DecoupledPipeline`; the rest is plain PyTorch.
    """
    torch.set_num_threads(1)
    _blocks, width, _batch, _cut, _samples = MODELS[model]
    stages = _stages(model)
    x, y = next(iter(batches(model)))
    synth = LinearDNI(width + 10, width, width, num_layers=0)
    opts = [torch.optim.Adam(s.parameters(), lr=LR, **ADAM) for s in stages]
    sopt = torch.optim.Adam(synth.parameters(), lr=SG_LR, **ADAM)
    ctx = F.one_hot(y, 10).float()

    def first() -> torch.Tensor:
        h = stages[0](x)
        with torch.no_grad():
            sg = synth(torch.cat([h.detach(), ctx], 1))[0]
        run_backward((h,), (sg,))
        update(opts[0])
        pred = synth(torch.cat([h.detach(), ctx], 1))[0]  # the recomputed prediction, trained on its target
        run_backward((pred,), (pred.detach() * 0.01,))
        update(sopt)
        return h.detach()

    h = first()

    def second() -> None:
        inp = h.clone().requires_grad_(True)
        F.cross_entropy(stages[1](inp), y).backward()
        update(opts[1])

    return [first, second]


def stage_times(model: str, steps: int = 40) -> list[float]:
    """Per-stage compute time (ms, median of ``steps``) of one DNI pipeline step, in one process, no messages."""
    out = []
    for fn in _stage_steps(model):
        for _ in range(3):
            fn()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        out.append(sorted(times)[len(times) // 2])
    return out


def _busy(model: str, started: Any, stop: Any) -> None:
    steps = _stage_steps(model)
    parent = mp.parent_process()
    started.set()
    while not stop.is_set() and (parent is None or parent.is_alive()):  # stops if the benchmark is killed
        for fn in steps:
            fn()


def stage_times_loaded(model: str) -> list[float]:
    """:func:`stage_times` while a second process runs the same stage loops on the other core, without messages.

    Each rank of the pipeline computes beside the other rank, so whatever a second busy process costs the first
    (shared caches and memory bandwidth; on a VM, perhaps a shared physical core) counts in these times:
    ``batch / max(these times)`` is the most a 2-stage pipeline can reach here. (On the development VM the loaded
    and lone times agree within the spread between runs.)
    """
    ctx = mp.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_busy, args=(model, started, stop), daemon=True)
    proc.start()
    try:
        while not started.wait(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"the load process stopped (exit code {proc.exitcode}) before it was busy")
        times = stage_times(model)
        if not proc.is_alive():
            raise RuntimeError(f"the load process stopped (exit code {proc.exitcode}) during the measurement")
        return times
    finally:
        stop.set()
        proc.join()


# --------------------------------------------------------------------------- main


def _ping_pong(rank: int, tmp: str, sizes: list[int], rounds: int) -> None:
    """Rank 0 sends a message of each size, rank 1 sends it back, ``rounds`` times per transport."""
    _join(rank, tmp)
    store = dist.distributed_c10d._get_default_store()
    links = {
        "socket": SocketLink(connect_socket(store, "bench", rank, 1 - rank, 60.0), 60.0, 8),
        "process_group": GroupLink(1 - rank, None, torch.device("cpu"), 8),
    }
    out: dict[str, dict[int, float]] = {}
    for name, link in links.items():
        for size in sizes:
            msg = torch.ones(size // 4)
            times = []
            for i in range(rounds + 5):  # the first rounds grow gloo's buffers and warm up
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    link.send(0, i, msg, 0)
                    link.recv()
                else:
                    link.send(0, i, link.recv()[2], 1)
                link.flush()
                times.append(time.perf_counter() - t0)
            out.setdefault(name, {})[size] = sorted(times[5:])[rounds // 2] / 2 * 1e6
    if rank == 0:
        Path(tmp, "messages.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def message_times(
    sizes: tuple[int, ...] = (1 << 16, 1 << 20), rounds: int = 200
) -> dict[str, dict[int, float]]:
    """One-way time (µs) of a message between two processes over each transport: the median of half a round trip
    (send, the peer receives it and sends it back), each side one thread."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ping_pong, args=(tmp, list(sizes), rounds), nprocs=2)
        raw = json.loads(Path(tmp, "messages.json").read_text())
    return {name: {int(k): v for k, v in row.items()} for name, row in raw.items()}


def _run_single(args: tuple[str, str, int, str]) -> None:
    model, method, threads, path = args
    Path(path).write_text(json.dumps(single(model, method, threads)))


def single_in_process(model: str, method: str, threads: int) -> dict[str, Any]:
    """Run a one-process method in a fresh process (its own thread pool, as the pipelines' ranks have)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        proc = mp.get_context("spawn").Process(target=_run_single, args=((model, method, threads, path),))
        proc.start()
        proc.join()
        return json.loads(Path(path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write results as JSON to this path")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="one round, fewer samples (smoke test)")
    parser.add_argument("--plot", help="write a bar chart of samples/s (best round) to this PNG")
    methods = [
        "backprop@1",
        "backprop@2",
        "backprop_default@2",
        "cdni",
        "gpipe",
        "1f1b",
        "dni_pipeline",
        "dni_pipeline_gloo",
    ]
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--no-bound", action="store_true", help="skip the per-stage compute times")
    args = parser.parse_args()
    methods = args.methods
    if args.quick:
        args.rounds = 1
        for name, (blocks, width, batch, cut, samples) in list(MODELS.items()):
            MODELS[name] = (blocks, width, batch, cut, samples // 10)
    res: dict[str, Any] = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "models": {
            k: dict(zip(["blocks", "width", "batch", "cut", "samples"], v, strict=True))
            for k, v in MODELS.items()
        },
        "load_before": os.getloadavg(),
        "results": {},
    }
    for model in args.models:
        rows: dict[str, Any] = {}
        for r in range(args.rounds):
            for method in methods:
                if method.startswith("backprop"):
                    name, threads = method.split("@")
                    out = single_in_process(model, name, int(threads))
                elif method == "cdni":
                    out = single_in_process(model, "cdni", 1)
                else:
                    out = two(model, method)
                row = rows.setdefault(method, {"samples_per_s": 0.0, "rounds": []})
                row["rounds"].append(out["samples_per_s"])
                row["samples_per_s"] = max(row["samples_per_s"], out["samples_per_s"])
                row["test_acc"] = out["test_acc"]
                if "stage_ms" in out:
                    row["stage_ms"] = out["stage_ms"]
                print(
                    f"{model} round {r} {method:12s} {out['samples_per_s']:9.0f} samples/s  test acc "
                    f"{out['test_acc']:.4f}  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        if not args.no_bound:
            rows["stage_compute_ms"] = stage_times(model)
            rows["stage_compute_loaded_ms"] = stage_times_loaded(model)
            batch = MODELS[model][2]
            best = max(rows["backprop@1"]["samples_per_s"], rows["backprop@2"]["samples_per_s"])
            bound = batch / max(rows["stage_compute_loaded_ms"]) * 1e3
            print(
                f"{model}: stage compute {rows['stage_compute_ms']} ms alone, {rows['stage_compute_loaded_ms']} ms beside "
                f"another busy process: a 2-stage pipeline's bound {bound:.0f} samples/s = {bound / best:.2f}x backprop's "
                "best",
                flush=True,
            )
        res["results"][model] = rows
    if not args.no_bound:
        res["message_us"] = message_times()
        print("one-way message time (µs):", res["message_us"], flush=True)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res["results"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    if args.plot:
        plot(res, args.plot)


def plot(res: dict[str, Any], path: str) -> None:
    """Samples/s (best round) of every method over the best single-process backprop, one group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(res["results"])
    methods = [m for m in res["results"][models[0]] if isinstance(res["results"][models[0]][m], dict)]
    fig, ax = plt.subplots(figsize=(2.6 * len(models) + 2, 3.8))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        vals = []
        for model in models:
            rows = res["results"][model]
            best = max(rows["backprop@1"]["samples_per_s"], rows["backprop@2"]["samples_per_s"])
            vals.append(rows[method]["samples_per_s"] / best)
        ax.bar([i + k * width for i in range(len(models))], vals, width, label=method)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models)
    ax.set_ylabel("samples/s / best backprop")
    ax.set_title("2 cores: one process vs 2 stages x 1 thread")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
