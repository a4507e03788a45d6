"""Benchmark: fine-tuning at inference memory (issue 21): MeZO-style vs ours (both modes) vs backprop.

Cases: (a) ``nn.TransformerEncoderLayer`` d=256 (4 heads, ff 1024), 16x128 tokens; (b) a GPT-2 built from a
``transformers`` config (4 layers, d=256, vocabulary 50257, tied head: 16.0M parameters), 8x128 tokens, LM loss;
(c) an MLP 1024-4096-4096-1024, batch 64. All parameters train, float32, σ = 1e-3, antithetic.

Methods (one SGD step each):

* ``mezo``: MeZO's ``zo_step``/``zo_update`` re-implemented (princeton-nlp/MeZO ``large_models/trainer.py``): reseed
  torch's RNG, ``θ += σz``, loss, ``θ -= 2σz``, loss, ``θ += σz`` (in place, z from ``torch.normal`` in the
  parameter's dtype), projected gradient ``(f⁺ − f⁻)/(2σ)``, then reseed and ``θ -= lr·g·z``; N directions are N
  such estimate-and-update rounds with lr/N;
* ``ours-zosgd``: `altgrad.zero_order.ZOSGD` (``memory="inference"``, ``Normal(0, 1)`` drawn under per-member seeds);
* ``ours-inference``: `ZeroOrderGradientModule` with ``memory="inference"`` + ``torch.optim.SGD`` (the ``.grad`` path:
  it also runs the unperturbed forward the module returns, so 2N + 1 forwards);
* ``ours-batched``: the same module with ``memory="batched"`` (default chunking) + SGD;
* ``backprop``: ``loss.backward()`` + SGD.

Memory: every (case, method, N) runs in its own process (1 thread); the number is the peak resident set (VmHWM)
after the steps minus the peak after two warm unperturbed forwards under ``no_grad`` (the process's inference peak).
One-time library costs (lazy imports, the first torch function mode, vmap, the autograd engine, the first
``torch.optim`` optimizer) are paid first by one step of the same method on a tiny model, so they count for no
method. Every worker runs under glibc's default allocator and again with a fixed 128 KiB mmap threshold
(`ALLOCATORS`): the default's rising threshold lets layer-sized blocks fragment the heap between activations.
Time: one process per case runs the methods in interleaved rounds (one step each per round) and reports medians; on a
shared machine the ratios of one round are more stable than the absolute times. Drift: max |Δθ| and the fraction of
parameter elements changed by one MeZO-style perturb/restore cycle (+σz, −2σz, +σz) without an update; ours never
writes a parameter while estimating.

Usage: ``python inference_memory.py [--quick] [--cases a,b,c] [--out results.json] [--plot results.png]
[--markdown table.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SIGMA = 1e-3
LR = 1e-6
CASES = {
    "a": "TransformerEncoderLayer d=256, 16x128 tokens",
    "b": "GPT-2 (transformers config, 4 layers, d=256, 16.0M params), 8x128 tokens",
    "c": "MLP 1024-4096-4096-1024, batch 64",
}
METHODS = ("mezo", "ours-zosgd", "ours-inference", "ours-batched", "backprop")


def _build(case: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The model and a closure returning its scalar loss on a fixed batch."""
    torch.manual_seed(0)
    if case == "a":
        model = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        x = torch.randn(16, 128, 256)
        return model, lambda: model(x).pow(2).mean()
    if case == "b":
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        config = GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0)
        config.attn_pdrop = 0.0
        model = GPT2LMHeadModel(config)
        model.eval()
        ids = torch.randint(0, config.vocab_size, (8, 128))
        return model, lambda: model(input_ids=ids, labels=ids).loss
    if case == "c":
        model = nn.Sequential(
            nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024)
        )
        x, y = torch.randn(64, 1024), torch.randn(64, 1024)
        return model, lambda: F.mse_loss(model(x), y)
    raise ValueError(f"unknown case {case!r}")


class MezoStyle:
    """MeZO's zo_step / zo_update, re-implemented (in-place perturbation regenerated from a reseeded global RNG)."""

    def __init__(self, model: nn.Module, loss: Callable[[], torch.Tensor], n: int) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss, self.n = loss, n
        self.rng = torch.Generator().manual_seed(1234)

    def perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * SIGMA

    @torch.no_grad()
    def step(self) -> float:
        total = 0.0
        for _ in range(self.n):
            seed = int(torch.randint(0, 1_000_000_000, (), generator=self.rng))
            self.perturb(seed, 1)
            f_plus = float(self.loss())
            self.perturb(seed, -2)
            f_minus = float(self.loss())
            self.perturb(seed, 1)
            projected = (f_plus - f_minus) / (2 * SIGMA)
            torch.manual_seed(seed)
            for p in self.params:
                z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
                p.data = p.data - (LR / self.n) * projected * z
            total += f_plus
        return total / self.n


def _stepper(method: str, model: nn.Module, loss: Callable[[], torch.Tensor], n: int) -> Callable[[], Any]:
    import altgrad.zero_order as zo

    if method == "mezo":
        return MezoStyle(model, loss, n).step
    if method == "ours-zosgd":
        opt = zo.ZOSGD(model, lr=LR, sigma=SIGMA, num_samples=n)
        return lambda: opt.step(loss)
    if method == "backprop":
        sgd = torch.optim.SGD(model.parameters(), lr=LR)

        def backprop() -> None:
            sgd.zero_grad(set_to_none=False)
            loss().backward()
            sgd.step()

        return backprop
    memory = "inference" if method == "ours-inference" else "batched"

    class Estimated(
        zo.ZeroOrderGradientModule, method="antithetic", num_samples=n, sigma=SIGMA, memory=memory
    ):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> torch.Tensor:
            return loss()

        def sample(self, sample_shape=torch.Size()):  # noqa: B008
            return torch.randn(sample_shape)

        def zero_order_distribution(self) -> Any:
            return torch.distributions.Normal(0.0, 1.0)

    net = Estimated()
    sgd = torch.optim.SGD(net.parameters(), lr=LR)

    def step() -> None:
        sgd.zero_grad(set_to_none=False)
        net().backward()
        sgd.step()

    return step


def _hwm_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(case: str, method: str, n: int, steps: int) -> dict[str, Any]:
    """One process: peak memory above the inference peak over ``steps`` steps (1 warm-up included)."""
    torch.set_num_threads(1)
    # one-time library costs (lazy imports, torch function modes, vmap, autograd engine) are paid on a tiny model
    tiny = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    tiny_x = torch.randn(2, 4)
    _stepper(method, tiny, lambda: tiny(tiny_x).pow(2).mean(), n)()
    torch.optim.SGD(
        tiny.parameters(), lr=0.1
    )  # the first torch.optim optimizer imports torch._dynamo (~70 MiB)
    model, loss = _build(case)
    step = _stepper(method, model, loss, n)
    with torch.no_grad():
        loss()
        loss()
    base = _hwm_kib()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "case": case,
        "method": method,
        "n": n,
        "inference_peak_mib": base / 1024,
        "extra_mib": (_hwm_kib() - base) / 1024,
        "step_ms_isolated": 1000 * statistics.median(times[1:] or times),
    }


def drift(case: str) -> dict[str, float]:
    """Max |Δθ| and fraction of elements changed by one MeZO-style +σz, −2σz, +σz cycle (no update)."""
    model, loss = _build(case)
    mezo = MezoStyle(model, loss, 1)
    before = [p.detach().clone() for p in mezo.params]
    with torch.no_grad():
        mezo.perturb(7, 1)
        mezo.perturb(7, -2)
        mezo.perturb(7, 1)
    changed = sum(int((p != b).sum()) for p, b in zip(mezo.params, before))
    total = sum(b.numel() for b in before)
    worst = max(float((p - b).abs().max()) for p, b in zip(mezo.params, before))
    return {"mezo_max_abs": worst, "mezo_changed_fraction": changed / total}


def timing(case: str, ns: list[int], rounds: int) -> dict[str, Any]:
    """One process: interleaved rounds, one step of every (method, N) per round; medians and per-round ratios."""
    torch.set_num_threads(1)
    model, loss = _build(case)
    keys = [(m, n) for n in ns for m in METHODS if not (m == "backprop" and n != ns[0])]
    steppers = {k: _stepper(k[0], model, loss, k[1]) for k in keys}
    for fn in steppers.values():  # warm-up
        fn()
    samples: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        for k, fn in steppers.items():
            start = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - start)
    out: dict[str, Any] = {"case": case, "rounds": rounds, "median_ms": {}, "ratio_to_mezo": {}}
    for (m, n), ts in samples.items():
        out["median_ms"][f"{m}@{n}"] = 1000 * statistics.median(ts)
        mezo = samples[("mezo", n)] if ("mezo", n) in samples else samples[("mezo", ns[0])]
        out["ratio_to_mezo"][f"{m}@{n}"] = statistics.median(t / r for t, r in zip(ts, mezo))
    # n sequential MeZO steps against ours at n (the goal at n >= 4)
    for n in ns[1:]:
        out["ratio_to_mezo"][f"ours-zosgd@{n}_vs_{n}x_mezo@1"] = statistics.median(
            t / (n * r) for t, r in zip(samples[("ours-zosgd", n)], samples[("mezo", ns[0])])
        )
    return out


#: The allocator settings memory is measured under: glibc's default (a dynamic mmap threshold that rises to the size
#: of the largest freed block, so later layer-sized blocks come from the heap, between activations, and fragment it)
#: and a fixed 128 KiB threshold (every block of 128 KiB or more is mapped and unmapped on its own).
ALLOCATORS = {"glibc-default": {}, "fixed-mmap-threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def _run(args: list[str], allocator: str = "glibc-default") -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **ALLOCATORS[allocator])
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(
    cases: list[str], ns: list[int], steps: int, rounds: int, memory_only: bool = False
) -> dict[str, Any]:
    """Memory (a process per case, method, N and allocator setting), timing and drift (a process per case)."""
    memory = []
    timings = []
    drifts = {}
    for case in cases:
        for n in ns:
            for method in METHODS:
                if method == "backprop" and n != ns[0]:
                    continue
                for allocator in ALLOCATORS:
                    print(
                        f"[inference-memory] memory {case} {method} N={n} {allocator}",
                        file=sys.stderr,
                        flush=True,
                    )
                    r = _run(["--worker", case, method, str(n), str(steps)], allocator)
                    memory.append({**r, "allocator": allocator})
        if memory_only:
            continue
        print(f"[inference-memory] timing {case}", file=sys.stderr, flush=True)
        timings.append(_run(["--timing", case, ",".join(map(str, ns)), str(rounds)]))
        drifts[case] = _run(["--drift", case])
    return {"memory": memory, "timing": timings, "drift": drifts, "ns": ns}


def table(results: dict[str, Any]) -> str:
    """Markdown table: extra peak memory above inference and time per step, per case."""
    ns = results["ns"]
    mem = {
        (r["case"], r["method"], r["n"], r.get("allocator", "glibc-default")): r for r in results["memory"]
    }
    tim = {t["case"]: t for t in results["timing"]}
    lines = []
    cases = sorted({r["case"] for r in results["memory"]})
    short = {"glibc-default": "", "fixed-mmap-threshold": " (fixed mmap)"}
    heads = (
        [f"extra MiB N={n}{short[a]}" for a in ALLOCATORS for n in ns]
        + [f"ms/step N={n}" for n in ns]
        + [f"time / MeZO N={n}" for n in ns]
    )
    lines.append("| case | method | " + " | ".join(heads) + " |")
    lines.append("|" + "---|" * (2 + len(heads)))
    for case in cases:
        t = tim.get(case, {"median_ms": {}, "ratio_to_mezo": {}})
        for method in METHODS:
            cells_m, cells_t, cells_r = [], [], []
            for allocator in ALLOCATORS:
                for n in ns:
                    r = mem.get((case, method, n, allocator))
                    cells_m.append("-" if r is None else f"{r['extra_mib']:.1f}")
            for n in ns:
                ms = t["median_ms"].get(f"{method}@{n}")
                cells_t.append("-" if ms is None else f"{ms:.0f}")
                ratio = t["ratio_to_mezo"].get(f"{method}@{n}")
                cells_r.append("-" if ratio is None else f"{ratio:.2f}")
            lines.append(f"| ({case}) | {method} | " + " | ".join(cells_m + cells_t + cells_r) + " |")
    extra = []
    for case in cases:
        base = mem.get((case, "mezo", ns[0], "glibc-default"))
        if base:
            extra.append(
                f"({case}) inference peak {base['inference_peak_mib']:.0f} MiB (the goal's 10%: "
                f"{0.1 * base['inference_peak_mib']:.0f} MiB above MeZO-style)"
            )
        t = tim.get(case)
        if t:
            for k, v in t["ratio_to_mezo"].items():
                if "_vs_" in k:
                    extra.append(f"({case}) {k.replace('_vs_', ' / ')}: {v:.2f}")
        d = results["drift"].get(case)
        if d:
            extra.append(
                f"({case}) MeZO-style perturb/restore drift: {100 * d['mezo_changed_fraction']:.1f}% of elements "
                f"changed, max |Δθ| {d['mezo_max_abs']:.1e} (ours: 0, parameters never written)"
            )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {e}" for e in extra) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    """Two panels: extra memory (log) and time per step relative to MeZO-style, grouped by case, at the first N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n0 = results["ns"][0]
    cases = sorted({r["case"] for r in results["memory"]})
    mem = {
        (r["case"], r["method"]): r["extra_mib"]
        for r in results["memory"]
        if r["n"] == n0 and r.get("allocator", "glibc-default") == "glibc-default"
    }
    tim = {t["case"]: t["ratio_to_mezo"] for t in results["timing"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [c + i * width for c in range(len(cases))]
        axes[0].bar(xs, [max(mem.get((c, method), 0.0), 0.5) for c in cases], width, label=method)
        axes[1].bar(xs, [tim.get(c, {}).get(f"{method}@{n0}", 0.0) for c in cases], width, label=method)
    titles = (
        f"peak memory above inference, MiB (N={n0}, log)",
        f"time per step / MeZO-style (N={n0}, interleaved)",
    )
    for ax, title in zip(axes, titles):
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([f"({c})" for c in cases])
        ax.set_title(title, fontsize=10)
    axes[0].set_yscale("log")
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].legend(fontsize=8)
    fig.suptitle(
        "fine-tuning at inference memory: (a) transformer layer, (b) GPT-2 16M, (c) MLP 96 MiB", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="cases a and c, 2 steps, 3 timing rounds")
    parser.add_argument("--cases", default=None, help="comma-separated subset of a,b,c")
    parser.add_argument("--ns", default="1,4", help="numbers of directions (default 1,4)")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--plot", help="write a PNG")
    parser.add_argument("--markdown", help="write the table as Markdown")
    parser.add_argument(
        "--memory-only", action="store_true", help="only the memory runs (no timing, no drift)"
    )
    parser.add_argument("--worker", nargs=4, metavar=("CASE", "METHOD", "N", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--timing", nargs=3, metavar=("CASE", "NS", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument("--drift", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        case, method, n, steps = args.worker
        print(json.dumps(worker(case, method, int(n), int(steps))))
        return 0
    if args.timing:
        case, ns, rounds = args.timing
        print(json.dumps(timing(case, [int(v) for v in ns.split(",")], int(rounds))))
        return 0
    if args.drift:
        print(json.dumps(drift(args.drift)))
        return 0
    cases = args.cases.split(",") if args.cases else (["a", "c"] if args.quick else ["a", "b", "c"])
    ns = [int(v) for v in args.ns.split(",")]
    steps, rounds = (2, 3) if args.quick else (3, 5)
    results = run_all(cases, ns, steps, rounds, memory_only=args.memory_only)
    results["meta"] = {
        "torch": torch.__version__,
        "threads": 1,
        "sigma": SIGMA,
        "steps": steps,
        "rounds": rounds,
    }
    md = table(results)
    results["table"] = md
    print(md)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(md)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
