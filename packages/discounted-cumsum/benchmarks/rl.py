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

* ``floor``: ``torch.add(reward, next_value, alpha=γ)``, one streaming pass that reads two tensors and writes one:
  the physical limit of an estimator without recursion (TD(0) reads three and writes one), measured in the same run,
* ``gae/sb3``: Stable-Baselines3's ``RolloutBuffer.compute_returns_and_advantage`` (its NumPy loop over time on its
  own time-major ``[T, B]`` float32 arrays, episode starts instead of dones), against ``gae_sb3_layout``: our GAE
  helper on the same arrays (``dim=0``).

TorchRL's and SB3's loops run only for T <= ``--loop-max-t`` (a Python step per time step). Each estimator's float32
output is compared with TorchRL's loop on the same inputs (max abs difference, reported).

Every measurement runs in a child process under each of two glibc allocator settings (``--allocators``), because on
this kind of machine the allocator, not the kernel, can decide the number: a fresh output's pages are faulted in on
first touch (about 0.7 ms per MB on the 2-core VM) and whether an output reuses freed pages depends on what ran
before. ``glibc-default``: glibc's dynamic thresholds (what a user gets). ``warm-heap``: freed blocks up to 32 MB stay
in the heap (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``), the steady state of a
training loop whose buffers are reused; outputs of 64 MB (T = 1e6) are mapped fresh in both. Usage::

    python packages/discounted-cumsum/benchmarks/rl.py --out docs/discounted-cumsum/bench_rl.json \
        --plot docs/discounted-cumsum/bench_rl.png
    python packages/discounted-cumsum/benchmarks/rl.py --quick --out /tmp/rl.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.benchmark import Timer

from altgrad.discounted_cumsum import __version__, cpu_isa, discounted_cumsum, generalized_advantage_estimate
from altgrad.discounted_cumsum.compat import torchrl as ours

GAMMA, LAM = 0.99, 0.95
ALLOCATORS = {
    "glibc-default": {},
    "warm-heap": {
        "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
        "MALLOC_TOP_PAD_": str(64 << 20),
    },
}
PEERS = ("torchrl", "torchrl_vec", "sb3")
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


def _sb3(b, t, d):
    """SB3's rollout buffer holding the same rollout, time-major; returns (its GAE call, ours on its arrays, check)."""
    import numpy as np
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    box = spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
    buf = RolloutBuffer(t, box, box, device="cpu", gae_lambda=LAM, gamma=GAMMA, n_envs=b)
    rew = d["r"].reshape(b, t).T.contiguous()  # [T, B]
    val = d["v"].reshape(b, t).T.contiguous()
    done = d["done"].reshape(b, t).T.contiguous()  # step t ended an episode: episode_starts[t + 1]
    starts = torch.zeros_like(done)
    starts[1:] = done[:-1]
    buf.rewards[:] = rew.numpy()
    buf.values[:] = val.numpy()
    buf.episode_starts[:] = starts.numpy()
    last_values, last_dones = torch.zeros(b), done[-1].numpy()
    theirs = lambda: buf.compute_returns_and_advantage(last_values, last_dones)  # noqa: E731
    ours_fn = lambda: generalized_advantage_estimate(rew, val, GAMMA, LAM, dones=done, bootstrap=0.0, dim=0)  # noqa: E731
    theirs()
    diff = (torch.from_numpy(buf.advantages).double() - ours_fn().double()).abs().max().item()
    return theirs, ours_fn, diff


def measure(args) -> list[dict]:
    """Every shape and thread count in this process (one allocator setting)."""
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
            "floor": lambda d=d: torch.add(d["r"], d["nv"], alpha=GAMMA),
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
        if t <= args.loop_max_t:
            cands["gae/sb3"], cands["gae_sb3_layout"], agree["gae_vs_sb3"] = _sb3(b, t, d)
        for th in threads:
            times: dict[str, list[float]] = {k: [] for k in cands}
            for _ in range(rounds):
                for k, fn in cands.items():
                    slow = ("torchrl" in k or "sb3" in k) and t > 2048
                    times[k].append(_time(fn, th, 0.0 if slow else args.min_run_time))
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append(
                {"shape": [b, t], "threads": th, "seconds": med, "max_abs_diff_vs_torchrl_loop": agree}
            )
    return results


def speedups(row: dict) -> dict[str, dict]:
    """Per estimator: ours (s), over the scan and the floor, and each peer's time over ours (SB3: same layout)."""
    med = row["seconds"]
    out = {}
    for key in med:
        if not key.endswith("/ours"):
            continue
        name = key[: -len("/ours")]
        o = med[key]
        e = {"ours_s": o, "x_scan": o / med["scan"], "x_floor": o / med["floor"]}
        for peer in PEERS:
            if f"{name}/{peer}" in med:
                base = med["gae_sb3_layout"] if peer == "sb3" else o
                e[peer] = med[f"{name}/{peer}"] / base
        peers = [e[p] for p in PEERS if p in e]
        if peers:
            e["vs_fastest_peer"] = min(peers)
        out[name] = e
    return out


def _print(allocator: str, results: list[dict]) -> None:
    for row in results:
        med = row["seconds"]
        b, t = row["shape"]
        print(
            f"\n[{allocator}] (B, T) = ({b}, {t}), {row['threads']} thread(s): scan {med['scan'] * 1e3:.2f} ms, "
            f"floor {med['floor'] * 1e3:.2f} ms, gae_helper {med['gae_helper'] / med['scan']:.2f}x scan"
        )
        for name, e in speedups(row).items():
            parts = [f"ours {e['ours_s'] * 1e3:.2f} ms ({e['x_scan']:.2f}x scan, {e['x_floor']:.1f}x floor)"]
            parts += [f"{p} {e[p]:.1f}x slower" for p in PEERS if p in e]
            if "vs_fastest_peer" in e:
                parts.append(
                    "10x met" if e["vs_fastest_peer"] >= 10 else f"10x NOT met ({e['vs_fastest_peer']:.1f}x)"
                )
            print(f"  {name:17s} " + ", ".join(parts))


def plot(data: dict, path: str) -> None:
    """Fastest peer's time over ours per estimator and shape, 1 thread, one panel per allocator setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(data["results"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4), sharey=True, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        rows = [r for r in data["results"][regime] if r["threads"] == 1]
        labels, values = [], []
        for row in rows:
            for name, e in speedups(row).items():
                if "vs_fastest_peer" in e:
                    labels.append(f"{name}\n{row['shape'][0]}x{row['shape'][1]}")
                    values.append(e["vs_fastest_peer"])
        ax.bar(range(len(values)), values, color=["tab:green" if v >= 10 else "tab:orange" for v in values])
        ax.axhline(10, color="k", ls="--", lw=1, label="goal: 10x")
        ax.set_yscale("log")
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
        ax.set_title(f"{regime}, 1 thread")
        ax.set_ylabel("fastest peer's time / ours")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--plot", default=None, help="PNG file for the plot")
    ap.add_argument("--quick", action="store_true", help="small shapes, one round (a dry run)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--p-done", type=float, default=0.01)
    ap.add_argument("--loop-max-t", type=int, default=4096)
    ap.add_argument("--vec-max-t", type=int, default=4096)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument(
        "--allocators", default=",".join(ALLOCATORS), help="comma-separated, of " + ", ".join(ALLOCATORS)
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    if args.child:  # one allocator setting, set by the parent in this process's environment
        json.dump(measure(args), sys.stdout)
        return
    import torchrl

    data = {"results": {}}
    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--out", "--plot", "--allocators"))]
    passthrough = [
        a for i, a in enumerate(passthrough) if not (i and passthrough[i - 1] in ("--out", "--plot"))
    ]
    for name in args.allocators.split(","):
        env = {**os.environ, **ALLOCATORS[name]}
        child = [sys.executable, __file__, "--child", *passthrough]
        proc = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the {name} run failed:\n{proc.stderr}")
        data["results"][name] = json.loads(proc.stdout)
        _print(name, data["results"][name])
    data["meta"] = {
        "version": __version__,
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "stable_baselines3": __import__("stable_baselines3").__version__,
        "cpu_isa": cpu_isa(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "p_done": args.p_done,
        "gamma": GAMMA,
        "lambda": LAM,
        "rounds": 1 if args.quick else args.rounds,
        "allocators": {k: ALLOCATORS[k] for k in data["results"]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average": list(os.getloadavg()),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
    if args.plot:
        plot(data, args.plot)


if __name__ == "__main__":
    main()
