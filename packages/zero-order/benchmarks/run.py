"""Benchmark: altgrad.zero_order vs TorchOpt 0.7.3, per gradient estimate, with the time split.

Cases (as in issue 8): Linear(32, 1) and an MLP 32-256-256-1 (74,497 parameters), batch 64, σ = 0.01,
N = 100 and 1000 directions, methods ``naive`` and ``antithetic``. For every case, in the same run:

- ``torchopt``: ``torchopt.diff.zero_order`` with ``Normal(0, 1)`` (skipped if TorchOpt is not importable);
- ``ours``: ``altgrad.zero_order.zero_order`` with the same user distribution and the same function;
- ``ours-table``: the same with :class:`~altgrad.zero_order.NoiseTable` (OpenAI-ES shared noise table);
- ``ours-lowrank``: :class:`~altgrad.zero_order.ZeroOrderGradientModule` with ``directions="lowrank", rank=1``
  and the user's ``Normal(0, 1)`` (factored ``nn.Linear`` layers, EGGROLL-style);
- limits: ``randn`` (``torch.randn`` of the N·P normals a dense estimate needs) and ``plain-forward`` (one
  unperturbed forward of all the population's rows, i.e. N·64 or 2N·64 rows through the same model).

Each estimate is split into sampling, population forward and the rest (perturbation, weights, accumulation,
autograd and Python overhead), each timed on its own with ``torch.utils.benchmark``.

First it prints issue 13's floor case (module API, antithetic, N = 100, MLP, the user's ``Normal(0, 1)`` through
``sample``): our time, the floor (sampling the N·P normals from the user's distribution + one plain forward of the
2N·64 rows) and the ratio to it. Without TorchOpt installed (e.g. on the GPU machine), the ``torchopt`` column is a
re-implementation of TorchOpt 0.7.3's backward loop (same Python structure).

Then (with the default ``--device all`` only) it runs ``inference_memory.py`` on the CPU (issue 21: MeZO-style vs
ours in both memory modes vs backprop, peak memory above inference and time per step), writing
``inference_memory.json`` (with the Markdown table) and ``inference_memory.png`` next to ``--out``.

Usage: ``python run.py [--quick] [--out results.json] [--plot results.png] [--device cpu|cuda|all]
[--skip-inference-memory]``; the GPU check is ``python run.py --device cuda --quick``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

import altgrad.zero_order as zo
from altgrad.zero_order._noise import NoiseSource
from altgrad.zero_order.gradient import EstimatorOptions, _directions_per_chunk, default_plans
from altgrad.zero_order.population import PopulationEvaluator

try:
    import torchopt
except ImportError:  # the peer is optional: its columns are skipped
    torchopt = None

SIGMA = 0.01
BATCH = 64


def _timeit(fn: Callable[[], Any], min_run_time: float, device: str) -> float:
    """Median seconds per call of ``fn`` (synchronising CUDA), over at least 5 blocks or calls."""
    if device == "cuda":

        def call() -> None:
            fn()
            torch.cuda.synchronize()

    else:
        call = fn
    call()  # warm-up (vmap tracing, allocator, lazy tables)
    timer = benchmark.Timer(stmt="call()", globals={"call": call})
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    if len(measured.times) >= 5:
        return measured.median
    # slow cases (about a second per call): the median of 5 single calls rather than of 1-2 blocks
    return statistics.median(timer.timeit(1).mean for _ in range(5))


def _model(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(32, 1)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def _normal(device: str) -> torch.distributions.Normal:
    return torch.distributions.Normal(torch.tensor(0.0, device=device), torch.tensor(1.0, device=device))


def _case(kind: str, n: int, method: str, device: str, min_run_time: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = _model(kind).to(device)
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(BATCH, 32, device=device)
    y = torch.randn(BATCH, 1, device=device)
    numel = sum(p.numel() for p in params)
    rows = (2 if method == "antithetic" else 1) * n

    def loss_fn(params: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)

    out: list[dict[str, Any]] = []

    def record(
        variant: str, total: float, sampling: float | None = None, forward: float | None = None
    ) -> None:
        rest = None if sampling is None or forward is None else max(0.0, total - sampling - forward)
        out.append(
            {
                "device": device,
                "model": kind,
                "params": numel,
                "N": n,
                "method": method,
                "variant": variant,
                "total_ms": total * 1e3,
                "sampling_ms": None if sampling is None else sampling * 1e3,
                "forward_ms": None if forward is None else forward * 1e3,
                "rest_ms": None if rest is None else rest * 1e3,
            }
        )

    # --- limits -----------------------------------------------------------------------------------------
    record("randn", _timeit(lambda: torch.randn(n * numel, device=device), min_run_time, device))
    x_rows = x.repeat(rows, 1)
    y_rows = y.repeat(rows, 1)
    with torch.no_grad():
        record("plain-forward", _timeit(lambda: F.mse_loss(model(x_rows), y_rows), min_run_time, device))

    # --- TorchOpt 0.7.3 (or, when it is not installed, a reimplementation of its loop) ------------------
    dist = _normal(device)
    if torchopt is not None:
        peer = torchopt.diff.zero_order(
            distribution=dist, method=method, argnums=0, num_samples=n, sigma=SIGMA
        )(loss_fn)
    else:
        peer = _torchopt_loop(dist, method, n, SIGMA)(loss_fn)

    def peer_step() -> None:
        torch.autograd.grad(peer(params, x, y), params)

    def peer_sampling() -> None:
        for _ in range(n):
            [dist.sample(sample_shape=p.shape) for p in params]

    perturbed = [tuple(p.detach() + SIGMA * dist.sample(p.shape) for p in params) for _ in range(min(n, 8))]

    def peer_forward() -> None:
        with torch.no_grad():
            for k in range(rows):
                loss_fn(perturbed[k % len(perturbed)], x, y)

    record(
        "torchopt",
        _timeit(peer_step, min_run_time, device),
        _timeit(peer_sampling, min_run_time, device),
        _timeit(peer_forward, min_run_time, device),
    )

    # --- ours: decorator with the user's distribution, and with the noise table -------------------------
    for variant, dist in (("ours", _normal(device)), ("ours-table", zo.NoiseTable(0))):
        ours = zo.zero_order(dist, method=method, argnums=0, num_samples=n, sigma=SIGMA)(loss_fn)

        def step(ours: Callable[..., torch.Tensor] = ours) -> None:
            torch.autograd.grad(ours(params, x, y), params)

        sampling, forward = _split_dense(loss_fn, params, dist, method, n, x, y, min_run_time, device)
        record(variant, _timeit(step, min_run_time, device), sampling, forward)

    # --- ours: module with factored low-rank directions -------------------------------------------------
    net = _lowrank_module(model, method, n, device)

    def lowrank_step() -> None:
        net(x, y).backward()
        for p in net.parameters():
            p.grad = None

    record(
        "ours-lowrank",
        _timeit(lowrank_step, min_run_time, device),
        *_split_lowrank(net, x, y, min_run_time, device),
    )
    return out


def _torchopt_loop(dist: Any, method: str, n: int, sigma: float) -> Callable[..., Any]:
    """TorchOpt 0.7.3's zero-order backward re-implemented (for machines without TorchOpt, e.g. the GPU check).

    Same structure as ``torchopt/diff/zero_order/decorator.py``: a new ``autograd.Function`` per call, and in
    ``backward`` a Python loop over the N samples drawing ``dist.sample(p.shape)`` per leaf and evaluating f at
    ``θ + σz`` (and ``θ − σz`` for antithetic) one member at a time.
    """

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def apply(params: tuple[torch.Tensor, ...], *rest: Any) -> torch.Tensor:
            class ZeroOrder(torch.autograd.Function):
                @staticmethod
                def forward(ctx: Any, *flat: torch.Tensor) -> torch.Tensor:
                    ctx.save_for_backward(*flat)
                    return fn(flat, *rest)

                @staticmethod
                def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    flat = ctx.saved_tensors
                    grads = [torch.zeros_like(p) for p in flat]
                    for _ in range(n):
                        noises = [dist.sample(sample_shape=p.shape) for p in flat]
                        plus = fn(tuple(p.add(z, alpha=sigma) for p, z in zip(flat, noises)), *rest)
                        if method == "antithetic":
                            minus = fn(tuple(p.sub(z, alpha=sigma) for p, z in zip(flat, noises)), *rest)
                            weight = grad_output * (plus - minus) * (0.5 / sigma)
                        else:
                            weight = grad_output * plus * (1.0 / sigma)
                        for g, z in zip(grads, noises):
                            g.add_(weight * z)
                    return tuple(g.div_(n) for g in grads)

            return ZeroOrder.apply(*params)

        return apply

    return decorator


def floor_case(device: str, rounds: int, n: int = 100) -> dict[str, Any]:
    """Issue 13's case: module API, antithetic, N = 100, σ = 0.01, batch 64, MLP 32-256-256-1, the user's
    ``Normal(0, 1)`` through the class's ``sample``; floor = drawing the N·P normals from that distribution
    (``sample((N, *p.shape))`` per leaf) + one plain forward of the 2N·64 rows.

    The three terms are timed *interleaved*: each round runs one estimate, one sampling and one plain forward (in
    a rotating order), so that a slow phase of the machine (on this 2-core VM the user's ``Normal.sample`` of
    30 MB swings between 33 and 70 ms with the allocator's state) hits all of them alike. Reported: the median of
    each term over the rounds, the ratio of the medians, and the 10th/90th percentiles of the per-round ratio.
    """
    torch.manual_seed(0)
    model = _model("mlp").to(device)
    distribution = _normal(device)

    class Net(zo.ZeroOrderGradientModule, method="antithetic", num_samples=n, sigma=SIGMA):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.model(x), y)

        def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
            return distribution.sample(sample_shape)

    net = Net()
    x = torch.randn(BATCH, 32, device=device)
    y = torch.randn(BATCH, 1, device=device)

    def step() -> None:
        net(x, y).backward()
        for p in net.parameters():
            p.grad = None

    shapes = [p.shape for p in net.parameters()]
    x_rows, y_rows = x.repeat(2 * n, 1), y.repeat(2 * n, 1)

    def sampling() -> list[torch.Tensor]:
        # all of it held at once, as an estimate must (freed when the call's result is dropped)
        return [distribution.sample((n, *s)) for s in shapes]

    def forward() -> None:
        with torch.no_grad():
            F.mse_loss(model(x_rows), y_rows)

    times = _interleaved({"ours": step, "sampling": sampling, "plain_forward": forward}, rounds, device)
    per_round = sorted(
        o / (s + f) for o, s, f in zip(times["ours"], times["sampling"], times["plain_forward"])
    )
    median = {name: statistics.median(ts) for name, ts in times.items()}
    floor = median["sampling"] + median["plain_forward"]
    return {
        "device": device,
        "case": f"module antithetic N={n} sigma={SIGMA} batch={BATCH} MLP 32-256-256-1, user's Normal via sample",
        "rounds": rounds,
        "ours_ms": median["ours"] * 1e3,
        "sampling_ms": median["sampling"] * 1e3,
        "plain_forward_ms": median["plain_forward"] * 1e3,
        "floor_ms": floor * 1e3,
        "ratio_to_floor": median["ours"] / floor,
        "ratio_p10": per_round[len(per_round) // 10],
        "ratio_p90": per_round[(9 * len(per_round)) // 10],
    }


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds of one call of each function per round, the functions run in turn (rotating the order)."""
    for fn in fns.values():  # warm-up: vmap tracing, the workspace, the allocator
        for _ in range(3):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fns[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def _split_dense(loss_fn, params, dist, method, n, x, y, min_run_time, device) -> tuple[float, float]:
    """Time the sampling and the population forward of our dense estimate on their own."""
    options = EstimatorOptions(method, n, SIGMA)
    source = NoiseSource(dist)
    plans = default_plans(options, params)
    per_chunk = _directions_per_chunk(options, params)
    chunks = [range(s, min(n, s + per_chunk)) for s in range(0, n, per_chunk)]
    antithetic = method == "antithetic"

    def sampling() -> None:
        for members in chunks:
            [plan.draw(source, p, members, 0) for plan, p in zip(plans, params)]

    noise = [plan.draw(source, p, chunks[0], 0) for plan, p in zip(plans, params)]
    inputs = [t for plan, p, z in zip(plans, params, noise) for t in plan.inputs(p, z, SIGMA, antithetic)]
    evaluator = PopulationEvaluator(lambda *leaves: loss_fn(leaves, x, y), "vmap")

    def forward() -> None:
        with torch.no_grad():
            for _ in chunks:
                evaluator(inputs)

    return _timeit(sampling, min_run_time, device), _timeit(forward, min_run_time, device)


def _lowrank_module(model: nn.Module, method: str, n: int, device: str) -> nn.Module:
    class LowRankNet(
        zo.ZeroOrderGradientModule, method=method, num_samples=n, sigma=SIGMA, directions="lowrank", rank=1
    ):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.distribution = _normal(device)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.model(x), y)

        def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
            return self.distribution.sample(sample_shape)

    return LowRankNet()


def _split_lowrank(net, x, y, min_run_time, device) -> tuple[float, float]:
    from altgrad.zero_order.module import _ModuleCall

    params = [p for _, p in net.named_parameters()]
    names = [name for name, _ in net.named_parameters()]
    options = type(net)._zero_order_options
    call = _ModuleCall(net, type(net).forward.__zero_order_original_forward__, names, (x, y), {}, options)
    plans = call._plans(params)
    source = NoiseSource(net.zero_order_distribution())
    n = options.num_samples
    per_chunk = _directions_per_chunk(options, params)
    chunks = [range(s, min(n, s + per_chunk)) for s in range(0, n, per_chunk)]
    antithetic = options.method == "antithetic"

    def sampling() -> None:
        for members in chunks:
            [plan.draw(source, p, members, 0) for plan, p in zip(plans, params)]

    noise = [plan.draw(source, p, chunks[0], 0) for plan, p in zip(plans, params)]
    inputs = [
        t for plan, p, z in zip(plans, params, noise) for t in plan.inputs(p.detach(), z, SIGMA, antithetic)
    ]
    evaluator = PopulationEvaluator(call._call_with, "vmap")

    def forward() -> None:
        with torch.no_grad():
            for _ in chunks:
                evaluator(inputs)

    return _timeit(sampling, min_run_time, device), _timeit(forward, min_run_time, device)


def _table(results: list[dict[str, Any]]) -> str:
    """Ratios per case: TorchOpt time / ours (speed-up), and our population forward / plain forward."""
    keyed: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in results:
        keyed.setdefault((r["device"], r["model"], r["N"], r["method"]), {})[r["variant"]] = r
    head = (
        f"{'device':6} {'model':6} {'N':>5} {'method':10} {'torchopt':>9} {'ours':>8} {'x':>6} "
        f"{'table':>8} {'x':>6} {'lowrank':>8} {'x':>6} {'randn':>8} {'plainfwd':>8} {'pop/plain':>9} {'lr-pop/plain':>12}"
    )
    lines = [head, "-" * len(head)]
    for (device, model, n, method), v in keyed.items():
        peer = v.get("torchopt", {}).get("total_ms")

        def cell(name: str, v: dict[str, dict[str, Any]] = v, peer: float | None = peer) -> str:
            t = v[name]["total_ms"]
            return f"{t:8.2f} " + (f"{peer / t:5.1f}x" if peer else "   n/a")

        plain = v["plain-forward"]["total_ms"]
        pop_ratio = v["ours"]["forward_ms"] / plain
        lowrank_ratio = v["ours-lowrank"]["forward_ms"] / plain
        lines.append(
            f"{device:6} {model:6} {n:5d} {method:10} "
            + (f"{peer:9.2f} " if peer else f"{'n/a':>9} ")
            + f"{cell('ours')} {cell('ours-table')} {cell('ours-lowrank')} "
            f"{v['randn']['total_ms']:8.2f} {plain:8.2f} {pop_ratio:9.2f} {lowrank_ratio:12.2f}"
        )
    split = ["", "time split (ms): sampling / population forward / rest"]
    for r in results:
        if r["sampling_ms"] is not None:
            split.append(
                f"  {r['device']:5} {r['model']:6} N={r['N']:<5d} {r['method']:10} {r['variant']:13} "
                f"{r['sampling_ms']:9.2f} / {r['forward_ms']:9.2f} / {r['rest_ms']:9.2f}   total {r['total_ms']:9.2f}"
            )
    return "\n".join(lines + split)


def _plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = ["torchopt", "ours", "ours-table", "ours-lowrank", "plain-forward"]
    cases = sorted({(r["device"], r["model"], r["N"], r["method"]) for r in results}, key=str)
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases)), 4.5))
    width = 0.8 / len(variants)
    for j, variant in enumerate(variants):
        ys = []
        for case in cases:
            match = [
                r
                for r in results
                if (r["device"], r["model"], r["N"], r["method"]) == case and r["variant"] == variant
            ]
            ys.append(match[0]["total_ms"] if match else float("nan"))
        ax.bar([i + j * width for i in range(len(cases))], ys, width, label=variant)
    ax.set_yscale("log")
    ax.set_ylabel("ms per gradient estimate (log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{d}\n{m} N={n}\n{meth}" for d, m, n, meth in cases], fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("zero-order gradient estimate: altgrad vs TorchOpt 0.7.3 (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 100 only and short timing runs")
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--plot", help="write a bar chart (PNG) to this path")
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument(
        "--skip-inference-memory",
        action="store_true",
        help="skip inference_memory.py (MeZO-style vs ours vs backprop; written next to --out as inference_memory.*)",
    )
    args = parser.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    ns = [100] if args.quick else [100, 1000]
    min_run_time = 0.1 if args.quick else 0.5
    results: list[dict[str, Any]] = []
    floors = []
    for device in devices:
        f = floor_case(device, rounds=15 if args.quick else 61)
        floors.append(f)
        print(
            f"[floor] {device}: {f['case']}, medians of {f['rounds']} interleaved rounds\n"
            f"        ours {f['ours_ms']:.2f} ms; floor {f['floor_ms']:.2f} ms = sampling {f['sampling_ms']:.2f} ms "
            f"+ plain forward {f['plain_forward_ms']:.2f} ms; ratio {f['ratio_to_floor']:.2f} (goal <= 1.2; "
            f"per round p10 {f['ratio_p10']:.2f}, p90 {f['ratio_p90']:.2f})",
            flush=True,
        )
    for device in devices:
        for kind in ("linear", "mlp"):
            for n in ns:
                for method in ("naive", "antithetic"):
                    print(f"[bench] {device} {kind} N={n} {method}", file=sys.stderr, flush=True)
                    results.extend(_case(kind, n, method, device, min_run_time))
    table = _table(results)
    print(table)
    meta = {
        "torch": torch.__version__,
        "torchopt": getattr(torchopt, "__version__", None) or "not installed: TorchOpt's loop re-implemented",
        "altgrad_zero_order": zo.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "sigma": SIGMA,
        "batch": BATCH,
        "quick": args.quick,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "floor": floors, "results": results, "table": table}, fh, indent=2)
    if args.plot:
        _plot(results, args.plot)
    if not args.skip_inference_memory and args.device == "all":  # the bench session; not --device runs
        import inference_memory

        out_dir = Path(args.out).parent if args.out else None
        extra = ["--quick"] if args.quick else []
        if out_dir is not None:
            extra += [
                "--out",
                str(out_dir / "inference_memory.json"),
                "--plot",
                str(out_dir / "inference_memory.png"),
            ]
        inference_memory.main(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
