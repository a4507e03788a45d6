"""Benchmarks for altgrad-es-layers: NESgpu's forward tables, update time and noise memory vs population size.

Reproduces the tables of the NESgpu README (batch = population = 1024, one example per member, forward only,
noise pre-sampled) for Linear (out, in) = 256², 512², 1024² and NESgpu's conv shapes, with the
columns Base (unperturbed layer on the whole batch), Naive (the unperturbed layer called once per member on a
batch of one, NESgpu's definition), Perturbed (IID), Sparse k=1/2, Permuted (+10 % input sparsity), Flipout
(sign flips: inputs / both sides) and LowRank r=1/4. Then the update ``Σ_k w_k E_k`` and the noise generation
for a (1024, 1024) layer as the population grows, with the noise memory a layer stores.

Usage::

    python packages/es-layers/benchmarks/run.py --out bench.json --plot bench.png [--quick] [--device cuda]
    python packages/es-layers/benchmarks/run.py --headline --device cuda --out es_layers_gpu.json   # issue 16
    python packages/es-layers/benchmarks/run.py --headline --device cpu --quick                     # seconds

``--quick`` on CUDA still measures Linear (1024, 1024) at batch 1024 (the headline shape) next to (256, 256).
``--headline`` measures only the issue-16 table: Linear (1024, 1024) at batch = population = 1024 (``--quick``:
(256, 256) at 256), each mode's forward time as a multiplier of the unperturbed layer, printed next to NESgpu's
published multipliers (GTX 1080 Ti, fp32) and the goals; the JSON gets a ``headline`` list. Every run prints and
stores the headline whenever the (1024, 1024) shape (or, with ``--quick``, the largest shape) was measured.

Times come from ``torch.utils.benchmark`` (``blocked_autorange``; the fastest block, each block averaging several
calls, which is robust to other jobs on a shared CPU). ``--threads 1`` gives steadier CPU numbers when the cores
are shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.utils.benchmark as tb
from torch import nn

import altgrad.es_layers as es

TARGETS = {  # goals: multiplier vs base at batch = population = 1024, Linear (1024, 1024) (issues 6 and 16)
    "LowRank r=1": 1.3,
    "Flipout (in)": 2.2,
    "Permuted": 2.5,
    "Sparse k=1": 2.0,
    "Perturbed": 20.0,
}
#: NESgpu README (commit d9f9f59): time multiplier vs base, Linear (1024, 1024), batch 1024, GTX 1080 Ti, fp32,
#: forward only, noise pre-sampled. NESgpu had no low-rank or Flipout Linear in that table.
NESGPU_1080TI = {"Perturbed": 40.02, "Sparse k=1": 2.09, "Sparse k=2": 3.40, "Permuted": 2.83}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, min_run_time: float) -> float:
    """Time of ``fn`` in ms (fastest timing block); a call slower than 2 s is timed once (its warm-up run)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()  # warm-up
    _sync(device)
    once = time.perf_counter() - t0
    if once > 2.0:
        return once * 1e3
    timer = tb.Timer(
        stmt="fn(); sync()",
        globals={"fn": fn, "sync": lambda: _sync(device)},
        num_threads=torch.get_num_threads(),
    )
    # min over timing blocks (each block averages several calls): robust to other jobs sharing the CPU
    return min(timer.blocked_autorange(min_run_time=min_run_time).times) * 1e3


def _linear_layers(n_in: int, n_out: int, pop: int, device, dtype) -> dict[str, nn.Module]:
    kw = {"device": device, "dtype": dtype, "seed": 0}
    return {
        "Perturbed": es.PerturbedLinear(n_in, n_out, pop, **kw),
        "Sparse k=1": es.SparsePerturbedLinear(n_in, n_out, pop, sparsity=1, **kw),
        "Sparse k=2": es.SparsePerturbedLinear(n_in, n_out, pop, sparsity=2, **kw),
        "Permuted": es.PermutedLinear(n_in, n_out, pop, permutation="in", **kw),
        "Permuted in_sparsity=.1": es.PermutedLinear(n_in, n_out, pop, in_sparsity=0.1, **kw),
        "Flipout (in)": es.FlipoutLinear(n_in, n_out, pop, flip="in", **kw),
        "Flipout (both)": es.FlipoutLinear(n_in, n_out, pop, flip="both", **kw),
        "LowRank r=1": es.LowRankLinear(n_in, n_out, pop, rank=1, **kw),
        "LowRank r=4": es.LowRankLinear(n_in, n_out, pop, rank=4, **kw),
    }


def _conv_layers(c_in: int, c_out: int, k: int, pop: int, device, dtype) -> dict[str, nn.Module]:
    kw = {"padding": k // 2, "device": device, "dtype": dtype, "seed": 0}
    return {
        "Perturbed": es.PerturbedConv2d(c_in, c_out, k, pop, **kw),
        "Permuted": es.PermutedConv2d(c_in, c_out, k, pop, permutation="out", **kw),
        "Permuted in_sparsity=.1": es.PermutedConv2d(c_in, c_out, k, pop, in_sparsity=0.1, **kw),
        "Flipout (in)": es.FlipoutConv2d(c_in, c_out, k, pop, flip="in", **kw),
        "Flipout (both)": es.FlipoutConv2d(c_in, c_out, k, pop, flip="both", **kw),
        "LowRank r=1": es.LowRankConv2d(c_in, c_out, k, pop, rank=1, **kw),
    }


def _forward_table(kind, shapes, pop, device, dtype, min_run_time, log) -> dict:
    """One NESgpu-style table: {column label: {row: ms}}."""
    table: dict[str, dict[str, float]] = {}
    for shape in shapes:
        if kind == "linear":
            n_out, n_in = shape
            label = f"({n_out}, {n_in})"
            x = torch.randn(pop, n_in, device=device, dtype=dtype)
            base = nn.Linear(n_in, n_out, device=device, dtype=dtype)
            layers = _linear_layers(n_in, n_out, pop, device, dtype)
        else:
            c_out, c_in, k, hw = shape
            label = f"({c_out}, {c_in}, ({k}, {k}), ({hw}, {hw}))"
            x = torch.randn(pop, c_in, hw, hw, device=device, dtype=dtype)
            base = nn.Conv2d(c_in, c_out, k, padding=k // 2, device=device, dtype=dtype)
            layers = _conv_layers(c_in, c_out, k, pop, device, dtype)
        row: dict[str, float] = {}
        with torch.no_grad():
            row["Base"] = _time_ms(lambda base=base, x=x: base(x), device, min_run_time)
            singles = list(x.split(1))

            def naive(base=base, singles=singles):
                for xi in singles:
                    base(xi)

            row["Naive"] = _time_ms(naive, device, min_run_time)
            for name, layer in layers.items():
                layer.load_state_dict(base.state_dict())
                layer.set_noise()
                layer.perturbed_flag = True
                row[name] = _time_ms(lambda layer=layer, x=x: layer(x), device, min_run_time)
                layer.free_memory()
                del layer
            layers.clear()
            # base timed again after the modes; the faster of the two (other jobs on a shared machine only slow)
            row["Base"] = min(row["Base"], _time_ms(lambda base=base, x=x: base(x), device, min_run_time))
        table[label] = row
        log(f"  {kind} {label}: " + ", ".join(f"{k} {v:.3g} ms" for k, v in row.items()))
    return table


def _population_sweep(size, pops, device, dtype, log) -> dict:
    """Noise generation, update time and stored noise memory vs population, for a (size, size) Linear."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for pop in pops:
        layers = _linear_layers(size, size, pop, device, dtype)
        for name in ("Perturbed", "Sparse k=1", "Permuted", "Flipout (both)", "LowRank r=1", "LowRank r=4"):
            layer = layers.pop(name)
            w = torch.randn(pop, device=device, dtype=dtype)
            if name == "Perturbed" and pop * size * size > 2**28 and device.type == "cpu":
                # IID noise of 1 GiB+: its size is exact arithmetic (N·m·n floats, plus N·m for the bias);
                # generating it three more times on a CPU would dominate the run, so times are not measured.
                mib = pop * (size * size + size) * torch.finfo(dtype).bits / 8 / 2**20
                out.setdefault(name, {})[str(pop)] = {
                    "set_noise_ms": None,
                    "update_ms": None,
                    "update_regenerated_ms": None,
                    "stored_noise_MiB": mib,
                    "derived": True,
                }
                log(f"  N={pop} {name}: stored noise {mib:.0f} MiB (derived, not timed on CPU)")
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base_mem = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            layer.set_noise()
            _sync(device)
            t_noise = (time.perf_counter() - t0) * 1e3
            stored = layer.noise_memory_bytes
            t_update = _time_ms(lambda layer=layer, w=w: layer.set_grad(w), device, 0.2)
            layer.free_memory()
            t_regen = _time_ms(lambda layer=layer, w=w: layer.set_grad(w), device, 0.2)
            rec = {
                "set_noise_ms": t_noise,
                "update_ms": t_update,
                "update_regenerated_ms": t_regen,
                "stored_noise_MiB": stored / 2**20,
            }
            if device.type == "cuda":
                rec["peak_extra_MiB"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
            out.setdefault(name, {})[str(pop)] = rec
            log(
                f"  N={pop} {name}: set_noise {t_noise:.1f} ms, update {t_update:.2f} ms "
                f"(regenerated {t_regen:.2f} ms), stored noise {stored / 2**20:.2f} MiB"
            )
            del layer
    return out


def _iid_strategies(shapes, device, dtype, min_run_time, log) -> list[dict]:
    """``functional.perturbed_linear`` without autograd, per strategy, against one plain forward of the same rows.

    Each case is ``(members n, rows per member and sign T, features)`` with 2 antithetic repeats. ``auto`` is what
    the function picks; ``split`` (``x Wᵀ`` plus the per-member ``x E_kᵀ``) and ``blocked`` (``W ± σE_k`` built in
    cache-sized blocks) are forced; ``shared`` is the same call with ``x`` expanded from one member's rows (the
    first layer of a zero-order estimate); ``plain`` is ``F.linear`` on all ``2 n T`` rows, the FLOPs floor.
    """
    import contextlib
    import unittest.mock as mock

    import torch.nn.functional as F

    import altgrad.es_layers.functional as EF

    rows = []
    for n, t, f in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randn(f, f, generator=g).to(device, dtype)
        b = torch.randn(f, generator=g).to(device, dtype)
        e = torch.randn(n, f, f, generator=g).to(device, dtype)
        eb = torch.randn(n, f, generator=g).to(device, dtype)
        x = torch.randn(2 * n, t, f, generator=g).to(device, dtype)
        x_shared = x[0].expand(2 * n, t, f)
        out = torch.empty(2 * n, t, f, device=device, dtype=dtype)

        def call(xx, min_rows=None, args=(w, b, e, eb, out)):
            """``perturbed_linear`` on ``xx``; ``min_rows`` forces a strategy (None: the function's own pick)."""
            forced = (
                contextlib.nullcontext()
                if min_rows is None
                else mock.patch.object(EF.iid, "_BLOCKED_MIN_ROWS", min_rows)
            )

            def run():
                with torch.no_grad(), forced:
                    EF.perturbed_linear(xx, *args[:4], sigma=0.01, antithetic=True, out=args[4])

            return run

        plain_args = (x.reshape(-1, f), w, b)
        times = {
            "plain": _time_ms(lambda a=plain_args: F.linear(*a), device, min_run_time),
            "auto": _time_ms(call(x), device, min_run_time),
            "split": _time_ms(call(x, 1 << 30), device, min_run_time),
            "blocked": _time_ms(call(x, -1), device, min_run_time),
            "shared": _time_ms(call(x_shared), device, min_run_time),
        }
        row = {"members": n, "rows": t, "features": f, **{k: round(v, 3) for k, v in times.items()}}
        rows.append(row)
        log(
            f"  n={n} T={t} {f}x{f}: plain {times['plain']:.2f} ms; auto {times['auto'] / times['plain']:.2f}x, "
            f"split {times['split'] / times['plain']:.2f}x, blocked {times['blocked'] / times['plain']:.2f}x, "
            f"shared input {times['shared'] / times['plain']:.2f}x"
        )
    return rows


def _markdown(table: dict, value: Callable[[str, dict], float | None], fmt: str) -> str:
    cols = list(table)
    rows = list(next(iter(table.values())))
    lines = ["| | " + " | ".join(cols) + " |", "|:--|" + "--:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = value(r, table[c])
            cells.append("" if v is None else format(v, fmt))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(results: dict) -> str:
    parts = []
    for kind in ("linear", "conv"):
        table = results["forward"][kind]
        parts.append(
            f"### {kind.capitalize()} forward, batch {results['config'][kind + '_batch']}: time (ms)"
        )
        parts.append(_markdown(table, lambda r, col: col[r], ".3f"))
        parts.append(f"### {kind.capitalize()} forward: time multiplier vs base (lower is better)")
        parts.append(_markdown(table, lambda r, col: col[r] / col["Base"], ".2f"))
    sweep = results["population"]
    size = results["config"]["sweep_size"]
    pops = list(next(iter(sweep.values())))
    for key, title in (  # (blank: not measured, see the JSON)
        ("update_ms", "update Σ w_k E_k with stored noise (ms)"),
        ("update_regenerated_ms", "update after free_memory(), noise regenerated (ms)"),
        ("set_noise_ms", "set_noise (ms)"),
        ("stored_noise_MiB", "stored noise (MiB)"),
    ):
        table = {f"N={p}": {name: sweep[name][p][key] for name in sweep} for p in pops}
        parts.append(f"### Linear ({size}, {size}): {title}")
        parts.append(_markdown(table, lambda r, col: col[r], ".3g"))
    return "\n\n".join(parts)


def _headline(results: dict) -> list[dict]:
    """Issue 16's table: each mode's multiplier vs base next to NESgpu's published one and the goal."""
    table = results["forward"]["linear"]
    label = "(1024, 1024)" if "(1024, 1024)" in table else list(table)[-1]
    col = table[label]
    rows = []
    for name in ("LowRank r=1", "Flipout (in)", "Permuted", "Sparse k=1", "Perturbed"):
        ratio = col[name] / col["Base"]
        goal = TARGETS[name]
        rows.append(
            {
                "mode": name,
                "shape": label,
                "batch": results["config"]["linear_batch"],
                "ms": col[name],
                "base_ms": col["Base"],
                "x_base": ratio,
                "nesgpu_1080ti_x_base": NESGPU_1080TI.get(name),
                "goal_x_base": goal,
                "met": ratio <= goal,
            }
        )
    return rows


def _headline_text(rows: list[dict], env: dict) -> str:
    head = rows[0]
    lines = [
        f"### Linear {head['shape']}, batch = population = {head['batch']}: forward time / unperturbed "
        f"({env['device_name']}, {env['dtype']})",
        "| mode | ours (x base) | NESgpu, GTX 1080 Ti (x base) | goal (x base) | |",
        "|:--|--:|--:|--:|:--|",
    ]
    for r in rows:
        peer = "-" if r["nesgpu_1080ti_x_base"] is None else f"{r['nesgpu_1080ti_x_base']:.2f}"
        lines.append(
            f"| {r['mode']} | {r['x_base']:.2f} | {peer} | <= {r['goal_x_base']} | {'ok' if r['met'] else 'MISSED'} |"
        )
    lines.append(f"(base: {head['base_ms']:.3f} ms; NESgpu's numbers are its README's, another GPU and era)")
    return "\n".join(lines)


def _targets(results: dict) -> list[str]:
    return [
        f"{r['mode']:<14} {r['x_base']:6.2f}x base at {r['shape']} (target <= {r['goal_x_base']}x): "
        f"{'ok' if r['met'] else 'MISSED'}"
        for r in results["headline"]
    ]


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one column of panels with large type: legible at the docs' text width (about 800 px)
    plt.rcParams.update({"font.size": 13, "axes.titlesize": 14, "legend.fontsize": 11})
    fig, axes = plt.subplots(3, 1, figsize=(9, 16))
    table = results["forward"]["linear"]
    names = [r for r in next(iter(table.values())) if r not in ("Base", "Naive")]
    width = 0.8 / len(table)
    for i, (label, col) in enumerate(table.items()):
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [col[n] / col["Base"] for n in names], width, label=f"Linear {label}")
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=40, ha="right")
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("forward time / unperturbed forward")
    axes[0].set_title(f"Forward, batch = population = {results['config']['linear_batch']}")
    axes[0].legend()
    sweep = results["population"]
    for name, recs in sweep.items():
        pops = [int(p) for p in recs]
        axes[1].plot(pops, [max(recs[str(p)]["stored_noise_MiB"], 1e-3) for p in pops], "o-", label=name)
        timed = [p for p in pops if recs[str(p)]["update_regenerated_ms"] is not None]
        axes[2].plot(timed, [recs[str(p)]["update_regenerated_ms"] for p in timed], "o-", label=name)
    size = results["config"]["sweep_size"]
    all_pops = results["config"]["populations"]
    axes[1].plot(
        all_pops,
        [p * 2 * size * 4 / 2**20 for p in all_pops],
        "k--",
        lw=1,
        label="layer input + output (N rows)",
    )
    for ax, title, ylabel in (
        (axes[1], f"Stored noise, Linear ({size}, {size})", "MiB"),
        (axes[2], f"Update from regenerated noise, Linear ({size}, {size})", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("population N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: the lines fill the axes
    fig.suptitle(
        f"altgrad-es-layers on {results['env']['device_name']} ({results['env']['threads']} threads)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.add_argument(
        "--plot-only",
        metavar="JSON",
        help="redraw --plot from the results JSON of an earlier run, run nothing",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    parser.add_argument(
        "--headline",
        action="store_true",
        help="only the issue-16 table: Linear (1024, 1024), batch = population = 1024 (--quick: 256)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--conv-batch", type=int, default=None, help="conv batch/population (CPU default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--whole-models",
        action="store_true",
        help="only the whole-model ES generations (transformer, LSTM policy) against EvoTorch and dense vmap; "
        "the other arguments go to benchmarks/whole_models.py",
    )
    args, rest = parser.parse_known_args(argv)
    if args.whole_models:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        import whole_models

        forwarded = [
            *rest,
            *(["--out", args.out] if args.out else []),
            *(["--plot", args.plot] if args.plot else []),
        ]
        forwarded += ["--threads", str(args.threads)] if args.threads else []
        forwarded += ["--quick"] if args.quick else []
        return whole_models.main(forwarded)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.plot_only:
        if not args.plot:
            parser.error("--plot-only needs --plot")
        with open(args.plot_only) as fh:
            saved = json.load(fh)
        _plot(saved, args.plot)
        print(f"wrote {args.plot} from {args.plot_only}")
        return saved
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(
            2, "es-layers benchmark: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False)\n"
        )
    dtype = torch.float32
    torch.manual_seed(0)
    if args.headline:
        linear_shapes, linear_batch = ([(256, 256)], 256) if args.quick else ([(1024, 1024)], 1024)
        conv_shapes, conv_batch, sweep_size, pops = [], 0, 0, []
        min_run_time = 0.05 if args.quick else 0.3
    elif args.quick and device.type == "cuda":  # a GPU runs the issue-16 headline shape in about a second
        linear_shapes, linear_batch = [(256, 256), (1024, 1024)], 1024
        conv_shapes = [(16, 16, 3, 32), (1024, 1024, 1, 1)]
        conv_batch = args.conv_batch or 256
        sweep_size, pops, min_run_time = 1024, [64, 256], 0.05
    elif args.quick:
        linear_shapes, linear_batch = [(256, 256), (512, 512)], 256
        conv_shapes = [(16, 16, 3, 32), (1024, 1024, 1, 1)]
        conv_batch = args.conv_batch or 32
        sweep_size, pops, min_run_time = 256, [64, 256], 0.05
    else:
        linear_shapes, linear_batch = [(256, 256), (512, 512), (1024, 1024)], 1024
        conv_shapes = [(16, 16, 3, 64), (32, 32, 3, 64), (64, 64, 3, 32), (32, 32, 1, 32), (1024, 1024, 1, 1)]
        conv_batch = args.conv_batch or (1024 if device.type == "cuda" else 64)
        sweep_size, pops, min_run_time = 1024, [64, 256, 1024], 0.3
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "CPU",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
    }
    config = {
        "linear_batch": linear_batch,
        "conv_batch": conv_batch,
        "sweep_size": sweep_size,
        "populations": pops,
        "quick": args.quick,
        "headline_only": args.headline,
    }

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"es-layers benchmark: {env}")
    started = time.perf_counter()
    results = {"env": env, "config": config, "forward": {}}
    log("Linear forward (batch = population, one example per member):")
    results["forward"]["linear"] = _forward_table(
        "linear", linear_shapes, linear_batch, device, dtype, min_run_time, log
    )
    results["headline"] = _headline(results)
    if not args.headline:
        log("Conv2d forward:")
        results["forward"]["conv"] = _forward_table(
            "conv", conv_shapes, conv_batch, device, dtype, min_run_time, log
        )
        log("Update and noise memory vs population:")
        results["population"] = _population_sweep(sweep_size, pops, device, dtype, log)
        log(
            "functional.perturbed_linear without autograd (2 antithetic repeats), multiple of one plain forward:"
        )
        iid_shapes = (
            [(100, 1, 128), (100, 64, 128)] if args.quick else [(100, t, 256) for t in (1, 4, 16, 64)]
        )
        results["iid_strategies"] = _iid_strategies(iid_shapes, device, dtype, min_run_time, log)
    results["wall_s"] = time.perf_counter() - started
    results["targets"] = _targets(results)
    if not args.headline:
        print()
        print(_report(results))
    print()
    print(_headline_text(results["headline"], env))
    print()
    print("\n".join(results["targets"]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
        log(f"wrote {args.out}")
    if args.plot and not args.headline:
        try:
            _plot(results, args.plot)
            log(f"wrote {args.plot}")
        except ImportError as exc:  # the JSON above has every number; the plot is optional
            log(f"no plot: {exc} (pip install matplotlib)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
