"""Step-time benchmark of AddSign / PowerSign against torch.optim.Adam, pytorch_optimizer's sign
optimizers (Lion, SignSGD) when installed, and a bandwidth floor, plus the digits training comparison.

Two parameter sets shaped like a stack of width-512 transformer blocks (12 tensors per block: qkv,
proj, fc1, fc2 weights and biases, two LayerNorms) plus an embedding: ~10M and ~40M parameters,
float32, on the CPU and (when available) on CUDA. Every optimizer steps the same parameters with
fixed gradients. Candidates are timed in interleaved rounds of ``torch.utils.benchmark.Timer``
(each round: the median of enough steps to last ~0.5 s). The table shows the median over rounds and
the median over rounds of the ratio to ``torch.optim.Adam(foreach=True)`` timed in the same round.

    python packages/sign-optim/benchmarks/run.py --out bench.json --plot bench.png [--quick]

The training comparison (``train_digits.py``) writes ``train_digits.png`` / its JSON section next to
``--plot`` / ``--out``; ``--skip-training`` leaves it out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as tb

from altgrad.sign_optim import AddSign, CosineInternalDecay, LinearInternalDecay, PowerSign

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WIDTH = 512
SIZES = {"10M": 3, "40M": 12}  # number of blocks
QUICK_SIZES = {"1M": 1}


def make_params(blocks: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Mixed-shape float32 parameters: an embedding plus ``blocks`` transformer blocks."""
    gen = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, ...]] = [(2048, WIDTH)]
    for _ in range(blocks):
        shapes += [
            (3 * WIDTH, WIDTH), (3 * WIDTH,), (WIDTH, WIDTH), (WIDTH,),
            (4 * WIDTH, WIDTH), (4 * WIDTH,), (WIDTH, 4 * WIDTH), (WIDTH,),
            (WIDTH,), (WIDTH,), (WIDTH,), (WIDTH,),
        ]  # fmt: skip
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def candidates(device: str, with_compile: bool) -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    """name -> factory(params) returning an object with ``.step()``."""
    lin = LinearInternalDecay(10_000)
    cos = CosineInternalDecay(10_000)
    out: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        "Adam (for-loop)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False),
        "Adam (foreach)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        "AddSign (for-loop)": lambda p: AddSign(p, foreach=False),
        "AddSign (foreach)": lambda p: AddSign(p, foreach=True),
        "AddSign-ld (foreach)": lambda p: AddSign(p, foreach=True, sign_internal_decay=lin),
        "PowerSign (for-loop)": lambda p: PowerSign(p, foreach=False),
        "PowerSign (foreach)": lambda p: PowerSign(p, foreach=True),
        "PowerSign-cd (foreach)": lambda p: PowerSign(p, foreach=True, sign_internal_decay=cos),
    }
    try:
        import pytorch_optimizer as po

        out["pytorch_optimizer Lion (foreach)"] = lambda p: po.Lion(p, lr=1e-4, foreach=True)
        out["pytorch_optimizer SignSGD (foreach)"] = lambda p: po.SignSGD(p, lr=1e-3, foreach=True)
    except ImportError:
        print("pytorch_optimizer is not installed: skipping its Lion and SignSGD", flush=True)
    if with_compile:

        class _Compiled:
            def __init__(self, p: list[torch.Tensor]) -> None:
                self.opt = AddSign(p, foreach=False)
                self.step = torch.compile(self.opt.step)

        out["AddSign (torch.compile)"] = _Compiled
    out["floor: _foreach_add_(p, g)"] = lambda p: _Floor(p)
    return out


class _Floor:
    """One read-modify-write pass over the parameters (SGD without momentum): a bandwidth floor."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.grads = [p.grad for p in params]

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_add_(self.params, self.grads, alpha=-1e-3)


def bench_all(
    factories: dict[str, Callable[[list[torch.Tensor]], Any]],
    params: list[torch.Tensor],
    rounds: int,
    min_time: float,
) -> dict[str, dict]:
    """Time every candidate in interleaved rounds, so that load from other processes hits all alike.

    Each round runs ``torch.utils.benchmark.Timer.timeit`` on every candidate in turn (enough steps to
    last about ``min_time`` seconds); a candidate's time is the median over rounds (and its minimum).
    """
    opts, timers, numbers = {}, {}, {}
    sync = "torch.cuda.synchronize()" if params[0].is_cuda else "pass"
    for name, factory in factories.items():
        try:
            opt = factory(params)
            for _ in range(3):  # state initialisation, compilation, warm caches
                opt.step()
        except Exception as exc:  # a peer failing must not hide the others
            print(f"  {name:<38} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        opts[name] = opt
        timers[name] = tb.Timer(stmt=f"opt.step(); {sync}", globals={"opt": opt, "torch": torch})
        once = timers[name].timeit(1).median
        numbers[name] = max(1, int(min_time / max(once, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.timeit(numbers[name]).median)
    out = {}
    for name in times:
        ts = sorted(times[name])
        out[name] = {
            "median_ms": ts[len(ts) // 2] * 1e3,
            "min_ms": ts[0] * 1e3,
            "round_ms": [t * 1e3 for t in times[name]],
            "rounds": len(ts),
            "steps_per_round": numbers[name],
        }
    del opts
    gc.collect()
    return out


def run_benchmarks(quick: bool, with_compile: bool) -> list[dict]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for size, blocks in (QUICK_SIZES if quick else SIZES).items():
            params = make_params(blocks, device)
            n = sum(p.numel() for p in params)
            print(f"\n== {device}, {size}: {n / 1e6:.1f}M parameters in {len(params)} tensors", flush=True)
            factories = candidates(device, with_compile and not quick)
            results = bench_all(factories, params, rounds=3 if quick else 7, min_time=0.2 if quick else 0.5)
            for name, r in results.items():
                r.update(
                    {"device": device, "size": size, "n_params": n, "n_tensors": len(params), "name": name}
                )
                rows.append(r)
                print(f"  {name:<38} {r['median_ms']:9.2f} ms  (min {r['min_ms']:.2f})", flush=True)
            del params
            gc.collect()
    for r in rows:
        base = next(
            x
            for x in rows
            if x["device"] == r["device"] and x["size"] == r["size"] and x["name"] == "Adam (foreach)"
        )
        # Paired statistic: the median over rounds of (this round's time / Adam foreach's time in the same
        # round), which cancels most of the load that other processes put on a shared machine.
        ratios = sorted(a / b for a, b in zip(r["round_ms"], base["round_ms"]))
        r["ratio_vs_adam_foreach"] = ratios[len(ratios) // 2]
        r["min_ratio_vs_adam_foreach"] = r["min_ms"] / base["min_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys((r["device"], r["size"]) for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    header = f"{'optimizer':<38}" + "".join(f" | {d} {s} ms (× Adam foreach)" for d, s in keys)
    print("\n" + header)
    print("-" * len(header))
    for name in names:
        line = f"{name:<38}"
        for d, s in keys:
            r = next((x for x in rows if x["name"] == name and x["device"] == d and x["size"] == s), None)
            line += " | " + (
                f"{r['median_ms']:9.2f} ({r['ratio_vs_adam_foreach']:.2f}×)" if r else "n/a"
            ).ljust(len(f" {d} {s} ms (× Adam foreach)") - 1)
        print(line)


def markdown_table(rows: list[dict]) -> str:
    """The step-time table in Markdown (median ms over rounds, and the paired ratio to Adam foreach)."""
    keys = list(dict.fromkeys((r["device"], r["size"]) for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    head = "| optimizer | " + " | ".join(f"{d} {s}: ms | × Adam foreach" for d, s in keys) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(keys)]
    for name in names:
        cells = []
        for d, s in keys:
            r = next((x for x in rows if x["name"] == name and x["device"] == d and x["size"] == s), None)
            cells += [f"{r['median_ms']:.1f}", f"{r['ratio_vs_adam_foreach']:.2f}"] if r else ["n/a", "n/a"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["device"], r["size"]) for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) * len(keys) + 1.5))
    height = 0.8 / len(keys)
    for k, (device, size) in enumerate(keys):
        values = []
        for name in names:
            r = next(
                (x for x in rows if x["name"] == name and x["device"] == device and x["size"] == size), None
            )
            values.append(r["ratio_vs_adam_foreach"] if r else 0.0)
        ypos = [i + k * height for i in range(len(names))]
        bars = ax.barh(ypos, values, height=height, label=f"{device}, {size} params")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.2, color="r", lw=0.8, ls="--", label="target 1.2× Adam foreach")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))])
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(
        "step time / Adam (foreach) step time in the same round, median over rounds (lower is faster)"
    )
    ax.set_title(
        f"optimizer step time, float32, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)"
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--plot", help="write the step-time ratios as PNG to this path")
    parser.add_argument(
        "--quick", action="store_true", help="a ~1M parameter set, short runs, short training"
    )
    parser.add_argument(
        "--skip-training", action="store_true", help="leave out the digits training comparison"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd AddSign")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads for the step timings (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = run_benchmarks(args.quick, with_compile=not args.no_compile)
    print_table(rows)
    print("\n" + markdown_table(rows))
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "quick": args.quick,
        "step_times": rows,
    }
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")

    if not args.skip_training:
        import train_digits

        print("\n== training comparison on sklearn digits", flush=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        training = train_digits.run(epochs=5 if args.quick else 20, seeds=[0] if args.quick else [0, 1])
        torch.set_num_threads(threads)
        train_digits.print_table(training)
        result["training"] = training
        if args.plot:
            train_plot = os.path.join(os.path.dirname(args.plot) or ".", "train_digits.png")
            train_digits.plot(training, train_plot)
            print(f"wrote {train_plot}")

    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
