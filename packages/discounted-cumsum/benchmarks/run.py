"""Benchmark of altgrad.discounted_cumsum against its peers and the copy-bandwidth limit.

Compares, on the same inputs and in the same run:

* ``ours``: ``altgrad.discounted_cumsum.discounted_cumsum_right`` (CPU: C++ SIMD + threads; CUDA: one launch),
* ``peer``: ``torch_discounted_cumsum.discounted_cumsum_right`` 1.1.0 (if installed; see
  requirements-no-build-isolation.txt),
* ``lfilter``: ``scipy.signal.lfilter([1], [1, -gamma], x[:, ::-1])[:, ::-1]`` (CPU only, numpy input),
* ``loop``: a Python loop over time with torch ops (the REINFORCE/CleanRL pattern; short rows only),
* ``clone``: ``x.clone()``, the copy-bandwidth limit (reads and writes the same bytes as a scan).
* ``hillis_steele``: the peer's algorithm reimplemented in torch (one pass per doubling distance, ceil(log2 N)
  passes of two kernel launches each: ``t = gamma^d * y[:, d:]`` then ``y[:, :-d] += t``), so that the comparison
  with the peer's algorithm exists on machines where the peer cannot be installed (e.g. the offline GPU machine).

Besides the table of shapes it measures, per device, what issue 16 asks for:

* ``bandwidth``: one row of 2^24, 2^26, 2^28 elements (CUDA; 2^18..2^22 on the CPU, 2^16..2^20 with ``--quick``),
  scalar gamma and with ``dones``: GB/s moved and the fraction of ``clone()``'s bandwidth (goal >= 0.75 on CUDA);
* ``latency``: shape (1, 100 000): time of one call divided by the time of one ``clone()`` (goal <= 1.5 on CUDA),
  and the Hillis-Steele time.

Times are medians from ``torch.utils.benchmark`` (which synchronises CUDA). Usage::

    python packages/discounted-cumsum/benchmarks/run.py --out bench.json --plot bench.png [--quick] [--device cuda]
    python packages/discounted-cumsum/benchmarks/run.py --device cpu --quick --out /tmp/dry.json   # seconds
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

from altgrad.discounted_cumsum import __version__, cpu_isa, discounted_cumsum, discounted_cumsum_right

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


def hillis_steele(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Right discounted cumsum of a [B, N] tensor by ceil(log2 N) doubling passes (the peer's parallel scheme)."""
    y = x.clone()
    n = x.shape[1]
    d = 1
    while d < n:
        t = (
            y[:, d:] * gamma**d
        )  # a temporary, so the pass reads the previous pass's values (double buffering)
        y[:, : n - d] += t
        d *= 2
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


GOAL_BANDWIDTH_FRACTION = 0.75  # issue 16: >= 75 % of copy bandwidth at 2^24..2^28 elements (CUDA)
GOAL_LATENCY_RATIO = 1.5  # issue 16: <= 1.5 x a clone() launch at (1, 1e5) (CUDA)


def bench_bandwidth(device: str, sizes, min_run_time: float) -> list[dict]:
    """One long row per size: bytes moved per second and the fraction of clone()'s bandwidth."""
    out = []
    for numel in sizes:
        x = torch.randn(1, numel, device=device)
        dones = torch.rand(1, numel, device=device) < 1e-3
        t_clone = _time("x.clone()", {"x": x}, min_run_time)
        env = {"f": discounted_cumsum, "x": x, "d": dones}
        t_ours = _time("f(x, 0.99, reverse=True)", env, min_run_time)
        t_dones = _time("f(x, 0.99, reverse=True, dones=d)", env, min_run_time)
        ref = discounted_cumsum(x.double(), 0.99, reverse=True)
        err = ((discounted_cumsum(x, 0.99, reverse=True).double() - ref).abs().max() / ref.abs().max()).item()
        del ref
        row = {
            "device": device,
            "numel": numel,
            "times_s": {"ours": t_ours, "ours_dones": t_dones, "clone": t_clone},
            # bytes: x read + y written (4 + 4), plus the 1-byte dones mask
            "gb_per_s": {
                "ours": 8 * numel / t_ours / 1e9,
                "ours_dones": 9 * numel / t_dones / 1e9,
                "clone": 8 * numel / t_clone / 1e9,
            },
            "fraction_of_clone_bandwidth": {
                "ours": t_clone / t_ours,
                "ours_dones": 9 / 8 * t_clone / t_dones,
            },
            "max_rel_err_vs_float64": err,
        }
        out.append(row)
        print(
            f"[{device} bandwidth 2^{int(math.log2(numel))}] ours {row['gb_per_s']['ours']:.1f} GB/s = "
            f"{row['fraction_of_clone_bandwidth']['ours']:.2f} x clone",
            file=sys.stderr,
        )
        del x, dones
    return out


def bench_latency(device: str, peer, min_run_time: float) -> dict:
    """Shape (1, 100 000): one call vs one clone() launch, vs the Hillis-Steele scheme and the peer."""
    x = torch.randn(1, 100_000, device=device) + 1.0
    env = {"f": discounted_cumsum_right, "h": hillis_steele, "x": x, "g": GAMMA}
    t = {
        "ours": _time("f(x, g)", env, min_run_time),
        "clone": _time("x.clone()", env, min_run_time),
        "hillis_steele": _time("h(x, g)", env, min_run_time),
    }
    if peer is not None:
        t["peer"] = _time("p(x, g)", {"p": peer, "x": x, "g": GAMMA}, min_run_time)
    ref = discounted_cumsum_right(x.double(), GAMMA)
    hs_err = ((hillis_steele(x, GAMMA).double() - ref).abs().max() / ref.abs().max()).item()
    return {
        "device": device,
        "shape": [1, 100_000],
        "times_s": t,
        "ours_over_clone": t["ours"] / t["clone"],
        "hillis_steele_over_ours": t["hillis_steele"] / t["ours"],
        "hillis_steele_launches": 1 + 2 * math.ceil(math.log2(100_000)),
        "max_rel_err_hillis_steele": hs_err,
        **({"peer_over_ours": t["peer"] / t["ours"]} if "peer" in t else {}),
    }


def goals(bandwidth: list[dict], latency: dict) -> dict:
    """Issue 16's goals, evaluated on the measured numbers (meaningful on CUDA; reported for any device)."""
    worst = min((r["fraction_of_clone_bandwidth"]["ours"] for r in bandwidth), default=float("nan"))
    return {
        "bandwidth_fraction_min": worst,
        "bandwidth_goal": GOAL_BANDWIDTH_FRACTION,
        "bandwidth_met": worst >= GOAL_BANDWIDTH_FRACTION,
        "latency_ratio": latency["ours_over_clone"],
        "latency_goal": GOAL_LATENCY_RATIO,
        "latency_met": latency["ours_over_clone"] <= GOAL_LATENCY_RATIO,
    }


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

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "run.py: --device cuda needs a CUDA GPU and torch with CUDA; none is available", file=sys.stderr
        )
        return 2
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
    extra = {}
    for device in devices:
        if device == "cuda":
            sizes = [2**24, 2**26, 2**28] if not args.quick else [2**20, 2**24]
        else:
            sizes = [2**18, 2**20, 2**22] if not args.quick else [2**16, 2**18, 2**20]
        bw = bench_bandwidth(device, sizes, min_run_time)
        lat = bench_latency(device, peer, min_run_time)
        extra[device] = {"bandwidth": bw, "latency": lat, "goals": goals(bw, lat)}
        g = extra[device]["goals"]
        print(
            f"{device}: worst fraction of clone bandwidth {g['bandwidth_fraction_min']:.2f} (goal >= "
            f"{GOAL_BANDWIDTH_FRACTION}); (1, 1e5) ours/clone {g['latency_ratio']:.2f} (goal <= {GOAL_LATENCY_RATIO}); "
            f"Hillis-Steele/ours {lat['hillis_steele_over_ours']:.2f}"
        )
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
            json.dumps(_finite({"meta": meta, "results": rows, "devices": extra}), indent=2, allow_nan=False)
            + "\n"
        )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
