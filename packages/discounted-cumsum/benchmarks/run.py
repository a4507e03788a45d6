"""Benchmark of altgrad.discounted_cumsum against its peers and the copy-bandwidth limit.

Compares, on the same inputs and in the same run:

* ``ours``: ``altgrad.discounted_cumsum.discounted_cumsum_right`` (CPU: C++ SIMD + threads; CUDA: one launch),
* ``peer``: ``torch_discounted_cumsum.discounted_cumsum_right`` 1.1.0 (if installed; see
  requirements-no-build-isolation.txt),
* ``lfilter``: ``scipy.signal.lfilter([1], [1, -gamma], x[:, ::-1])[:, ::-1]`` (CPU only, numpy input),
* ``loop``: a Python loop over time with torch ops (the REINFORCE/CleanRL pattern; short rows only),
* ``clone``: ``x.clone()``, the copy-bandwidth limit (reads and writes the same bytes as a scan).

Times are medians from ``torch.utils.benchmark`` (which synchronises CUDA). Usage::

    python packages/discounted-cumsum/benchmarks/run.py --out bench.json --plot bench.png [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from altgrad.discounted_cumsum import __version__, cpu_isa, discounted_cumsum_right

GAMMA = 0.99
SHAPES = [(1, 100_000), (64, 10_000), (1024, 1000), (16, 1_000_000), (1, 2**24), (4096, 256), (8, 128)]
QUICK_SHAPES = [(1, 100_000), (64, 10_000), (1024, 1000), (4096, 256), (8, 128)]
LOOP_MAX_N = 1000  # the Python loop runs only on rows this short


def _peer():
    try:
        import torch_discounted_cumsum as peer
    except Exception as exc:  # the peer's own import falls back to a JIT build that may fail loudly
        print(f"[peer] torch-discounted-cumsum unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return peer.discounted_cumsum_right


def _lfilter():
    try:
        from scipy.signal import lfilter
    except ImportError:
        print("[lfilter] scipy unavailable", file=sys.stderr)
        return None

    def run(a):
        return lfilter([1.0], [1.0, -GAMMA], a[:, ::-1], axis=1)[:, ::-1]

    return run


def python_loop(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The scan as RL code writes it: one torch op per time step."""
    y = torch.empty_like(x)
    running = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        running = x[:, t] + gamma * running
        y[:, t] = running
    return y


def _time(stmt: str, env: dict, min_run_time: float) -> float:
    return Timer(stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


def _finite(v):
    """JSON has no inf/nan: non-finite errors (the peer's garbage rows) are stored as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(u) for k, u in v.items()}
    if isinstance(v, list):
        return [_finite(u) for u in v]
    return v


def bench_shape(shape, device, peer, lfilter, min_run_time) -> dict:
    x = torch.randn(shape, device=device) + 1.0
    ref = discounted_cumsum_right(x.double(), GAMMA)
    row = {"shape": list(shape), "numel": x.numel(), "device": device, "dtype": "float32", "times_s": {}}
    t = row["times_s"]
    y = discounted_cumsum_right(x, GAMMA)
    row["max_rel_err_ours"] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    t["ours"] = _time("f(x, g)", {"f": discounted_cumsum_right, "x": x, "g": GAMMA}, min_run_time)
    t["clone"] = _time("x.clone()", {"x": x}, min_run_time)
    if peer is not None and (device == "cpu" or x.shape[0] <= 65535):
        yp = peer(x, GAMMA)
        row["max_rel_err_peer"] = ((yp.double() - ref).abs().max() / ref.abs().max()).item()
        t["peer"] = _time("f(x, g)", {"f": peer, "x": x, "g": GAMMA}, min_run_time)
    if lfilter is not None and device == "cpu":
        a = x.numpy()
        t["lfilter"] = _time("f(a)", {"f": lfilter, "a": a}, min_run_time)
    if x.shape[1] <= LOOP_MAX_N:
        t["loop"] = _time("f(x, g)", {"f": python_loop, "x": x, "g": GAMMA}, min_run_time)
    row["ours_gelem_per_s"] = x.numel() / t["ours"] / 1e9
    row["ours_vs_clone_throughput"] = t["clone"] / t["ours"]
    for other in ("peer", "lfilter", "loop"):
        if other in t:
            row[f"speedup_vs_{other}"] = t[other] / t["ours"]
    return row


def print_table(rows) -> None:
    head = f"{'device':6} {'shape':>14} {'ours us':>10} {'Gelem/s':>8} {'clone/ours':>10} {'peer/ours':>10} {'lfilt/ours':>10} {'loop/ours':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:

        def f(k, r=r):
            return f"{r[k]:10.2f}" if k in r else f"{'-':>10}"

        print(
            f"{r['device']:6} {tuple(r['shape'])!s:>14} {r['times_s']['ours'] * 1e6:10.1f} {r['ours_gelem_per_s']:8.2f} "
            f"{r['ours_vs_clone_throughput']:10.2f} {f('speedup_vs_peer')} {f('speedup_vs_lfilter')} {f('speedup_vs_loop')}"
        )


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["ours", "clone", "peer", "lfilter", "loop"]
    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(1, len(devices), figsize=(7 * len(devices), 4.5), squeeze=False)
    for ax, device in zip(axes[0], devices):
        rs = [r for r in rows if r["device"] == device]
        width = 0.8 / len(methods)
        for k, m in enumerate(methods):
            xs = [i + (k - len(methods) / 2) * width for i, r in enumerate(rs) if m in r["times_s"]]
            ys = [r["numel"] / r["times_s"][m] / 1e9 for r in rs if m in r["times_s"]]
            if xs:
                ax.bar(xs, ys, width, label=m)
        ax.set_xticks(range(len(rs)), [f"{r['shape'][0]}x{r['shape'][1]}" for r in rs], rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel("throughput (Gelem/s, higher is better)")
        ax.set_title(f"discounted cumsum, float32, {device}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    p.add_argument("--quick", action="store_true", help="smaller shapes and shorter timing (a smoke run)")
    p.add_argument(
        "--device", choices=["cpu", "cuda", "all"], default="all", help="'all': CPU, plus CUDA if present"
    )
    args = p.parse_args(argv)

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all" and torch.cuda.is_available():
        devices.append("cuda")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    min_run_time = 0.05 if args.quick else 0.5
    peer, lfilter = _peer(), _lfilter()
    torch.manual_seed(0)
    rows = []
    for device in devices:
        for shape in shapes:
            t0 = time.perf_counter()
            rows.append(bench_shape(shape, device, peer, lfilter, min_run_time))
            print(f"[{device} {shape}] {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print_table(rows)
    meta = {
        "altgrad_discounted_cumsum": __version__,
        "torch": torch.__version__,
        "cpu_isa": cpu_isa(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
        "peer_available": peer is not None,
        "gamma": GAMMA,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(_finite({"meta": meta, "results": rows}), indent=2, allow_nan=False) + "\n"
        )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
