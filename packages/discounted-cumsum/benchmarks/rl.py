"""Benchmark of the fused RL estimators against TorchRL's functional ones and the plain scan.

For each shape ``(B, T)`` (TorchRL's layout ``[B, T, 1]``, time on dim -2, float32, γ = 0.99, λ = 0.95, dones with
probability ``--p-done``, half of them terminated, the rest truncated) and each thread count, in one process and
interleaved (every candidate once per round, ``--rounds`` rounds, the median kept):

* ``ours``: ``altgrad.discounted_cumsum.compat.torchrl.<estimator>`` (the fused C++ kernel),
* ``torchrl``: ``torchrl.objectives.value.functional.<estimator>`` (the loop over time),
* ``torchrl_vec``: TorchRL's ``vec_*`` version where it has one (skipped for T > ``--vec-max-t``: it pads every
  trajectory to the longest and convolves, minutes per call at (16, 1e6) with dones),
* ``scan``: ``discounted_cumsum(x, γλ, reverse=True, dones=dones)`` on ``[B, T]``, the bare scan the issue measures
  GAE against (goal: GAE <= 1.5x of it),
* ``gae_helper``: ``altgrad.discounted_cumsum.generalized_advantage_estimate`` on ``[B, T]`` (values shifted in the
  kernel, next value from ``bootstrap``).

TorchRL's loops run only for T <= ``--loop-max-t`` (a Python step per time step). Each estimator's float32 output is
compared with TorchRL's loop on the same inputs (max abs difference, reported). Usage::

    python packages/discounted-cumsum/benchmarks/rl.py --out docs/discounted-cumsum/bench_rl.json
    python packages/discounted-cumsum/benchmarks/rl.py --quick --out /tmp/rl.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.benchmark import Timer

from altgrad.discounted_cumsum import __version__, cpu_isa, discounted_cumsum, generalized_advantage_estimate
from altgrad.discounted_cumsum.compat import torchrl as ours

GAMMA, LAM = 0.99, 0.95
SHAPES = [(256, 2048), (16, 1_000_000), (4096, 128)]
QUICK_SHAPES = [(64, 512), (4, 20_000)]


def _inputs(b, t, p_done, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, v, nv, lp = (torch.randn(b, t, 1, generator=g) for _ in range(4))
    lm = lp + 0.3 * torch.randn(b, t, 1, generator=g)
    done = torch.rand(b, t, 1, generator=g) < p_done
    term = done & (torch.rand(b, t, 1, generator=g) < 0.5)
    return {"r": r, "v": v, "nv": nv, "lp": lp, "lm": lm, "done": done, "term": term}


def _estimators(trl):
    """name -> (ours, torchrl loop, torchrl vec or None), each a function of the inputs dict."""

    def gae(m):
        return lambda d: m.generalized_advantage_estimate(
            GAMMA, LAM, d["v"], d["nv"], d["r"], d["done"], d["term"]
        )

    def vgae(m):
        return lambda d: m.vec_generalized_advantage_estimate(
            GAMMA, LAM, d["v"], d["nv"], d["r"], d["done"], d["term"]
        )

    def tdl(m, vec=False):
        f = m.vec_td_lambda_return_estimate if vec else m.td_lambda_return_estimate
        return lambda d: f(GAMMA, LAM, d["nv"], d["r"], d["done"], d["term"])

    def td1(m, vec=False):
        f = m.vec_td1_return_estimate if vec else m.td1_return_estimate
        return lambda d: f(GAMMA, d["nv"], d["r"], d["done"], d["term"])

    def td0(m):
        return lambda d: m.td0_return_estimate(GAMMA, d["nv"], d["r"], d["term"])

    def vtrace(m):
        return lambda d: m.vtrace_advantage_estimate(
            GAMMA, d["lp"], d["lm"], d["v"], d["nv"], d["r"], d["done"], d["term"]
        )

    return {
        "gae": (gae(ours), gae(trl), vgae(trl)),
        "td_lambda_return": (tdl(ours), tdl(trl), tdl(trl, vec=True)),
        "td1_return": (td1(ours), td1(trl), td1(trl, vec=True)),
        "td0_return": (td0(ours), td0(trl), None),
        "vtrace": (vtrace(ours), vtrace(trl), None),
    }


def _time(fn, threads, min_run_time):
    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--quick", action="store_true", help="small shapes, one round (a dry run)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--p-done", type=float, default=0.01)
    ap.add_argument("--loop-max-t", type=int, default=4096)
    ap.add_argument("--vec-max-t", type=int, default=4096)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    args = ap.parse_args()
    import torchrl
    import torchrl.objectives.value.functional as trl

    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = 1 if args.quick else args.rounds
    threads = [int(t) for t in args.threads.split(",")]
    est = _estimators(trl)
    results = []
    for b, t in shapes:
        d = _inputs(b, t, args.p_done)
        flat = {k: x.reshape(b, t) for k, x in d.items()}
        boot = torch.zeros(b)
        cands = {
            "scan": lambda f=flat: discounted_cumsum(f["r"], GAMMA * LAM, reverse=True, dones=f["done"]),
            "gae_helper": lambda f=flat, b0=boot: generalized_advantage_estimate(
                f["r"], f["v"], GAMMA, LAM, dones=f["done"], bootstrap=b0
            ),
        }
        agree = {}
        for name, (fo, fl, fv) in est.items():
            cands[f"{name}/ours"] = lambda fo=fo, d=d: fo(d)
            if t <= args.loop_max_t:
                cands[f"{name}/torchrl"] = lambda fl=fl, d=d: fl(d)
                ref = _first(fl(d)).double()
                agree[name] = (_first(fo(d)).double() - ref).abs().max().item()
            if fv is not None and t <= args.vec_max_t:
                cands[f"{name}/torchrl_vec"] = lambda fv=fv, d=d: fv(d)
        for th in threads:
            times: dict[str, list[float]] = {k: [] for k in cands}
            for _ in range(rounds):
                for k, fn in cands.items():
                    slow = "torchrl" in k and t > 2048
                    times[k].append(_time(fn, th, 0.0 if slow else args.min_run_time))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"shape": [b, t], "threads": th, "seconds": med, "max_abs_diff_vs_torchrl_loop": agree}
            results.append(row)
            print(f"\n(B, T) = ({b}, {t}), {th} thread(s): scan {med['scan'] * 1e3:.2f} ms")
            print(
                f"  gae_helper {med['gae_helper'] * 1e3:.2f} ms = {med['gae_helper'] / med['scan']:.2f}x scan"
            )
            for name in est:
                o = med[f"{name}/ours"]
                parts = [f"ours {o * 1e3:.2f} ms ({o / med['scan']:.2f}x scan)"]
                for peer in ("torchrl", "torchrl_vec"):
                    if f"{name}/{peer}" in med:
                        parts.append(f"{peer} {med[f'{name}/{peer}'] / o:.1f}x slower")
                print(f"  {name:17s} " + ", ".join(parts))
    meta = {
        "version": __version__,
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "cpu_isa": cpu_isa(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "p_done": args.p_done,
        "gamma": GAMMA,
        "lambda": LAM,
        "rounds": rounds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average": list(__import__("os").getloadavg()),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
