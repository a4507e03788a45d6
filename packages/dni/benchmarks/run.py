"""Reproduction and benchmark for altgrad.dni.

1. Digits MLP (sklearn's 8×8 digits, an MNIST stand-in that ships with scikit-learn): test accuracy of
   backprop, DNI and cDNI after the same number of steps, for networks of 3 to 6 layers (paper, Table 1 shape).
2. Copy task (generated on the fly): longest sequence solved by an LSTM trained with truncated BPTT at window
   T, with and without a synthetic gradient injected at each window end (paper §3.1).
3. Step time of a DNI / cDNI training step relative to a backprop step (``torch.utils.benchmark``).

Usage::

    python packages/dni/benchmarks/run.py --out docs/dni/bench.json --plot docs/dni/bench.png [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from altgrad.dni import DNI, BackwardInterface, LinearDNI
from altgrad.dni._optim import update

# --------------------------------------------------------------------------- digits MLP


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = 360
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 0.1
    x = (x - mean) / std
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def make_mlp(layers: int, width: int, seed: int) -> nn.Sequential:
    """``layers − 1`` hidden blocks ``Linear → BatchNorm1d → ReLU`` (the paper's FCN) and a Linear classifier."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    fan_in = 64
    for _ in range(layers - 1):
        mods.append(nn.Sequential(nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU()))
        fan_in = width
    mods.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*mods)


class Trainer:
    """One training configuration: ``step(x, y)`` does a full update."""

    def __init__(
        self, method: str, layers: int, width: int, seed: int, lr: float, sg_lr: float, sg_hidden: int
    ) -> None:
        self.method = method
        self.net = make_mlp(layers, width, seed)
        if method == "backprop":
            self.model: nn.Module = self.net
            self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, fused=True)
            return
        # One interface per hidden block (on its output): N layers → N−1 DNIs, as in the paper.
        blocks = [name for name, m in self.net.named_children() if isinstance(m, nn.Sequential)]
        conditional = method == "cdni"
        self.model = DNI(
            self.net,
            hidden_size=sg_hidden,
            dni_network=LinearDNI,
            # cDNI: a linear synthesizer of (h, one-hot label), as in the paper; DNI: a 2-hidden-layer MLP.
            dni_params={"num_layers": 0 if conditional else 2},
            grad_optim="adam",
            grad_lr=sg_lr,
            lr=lr,
            context_size=10 if conditional else 0,
            modules=blocks,
        )
        # The wrapper updates the hidden blocks at forward time; the classifier is trained by the loss.
        self.opt = torch.optim.Adam(self.net[-1].parameters(), lr=lr, fused=True)
        self.conditional = conditional

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.method == "backprop":
            out = self.model(x)
        else:
            out = self.model(x, context=y if self.conditional else None)
        loss = F.cross_entropy(out, y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        acc = (self.model(x).argmax(1) == y).float().mean().item()
        self.model.train()
        return acc


def run_digits(depths: list[int], steps: int, seeds: list[int], width: int, batch: int) -> dict[str, Any]:
    xtr, ytr, xte, yte = load_digits_split()
    results: dict[str, Any] = {"steps": steps, "batch": batch, "width": width, "seeds": seeds, "accuracy": {}}
    for layers in depths:
        row = {}
        for method in ("backprop", "dni", "cdni"):
            accs = []
            t0 = time.perf_counter()
            for seed in seeds:
                trainer = Trainer(
                    method,
                    layers,
                    width,
                    seed,
                    lr=1e-3,
                    sg_lr=1e-4 if method == "dni" else 1e-3,
                    sg_hidden=256,
                )
                g = torch.Generator().manual_seed(1000 + seed)
                for _ in range(steps):
                    idx = torch.randint(0, len(xtr), (batch,), generator=g)
                    trainer.step(xtr[idx], ytr[idx])
                accs.append(trainer.accuracy(xte, yte))
            row[method] = sum(accs) / len(accs)
            row[f"{method}_runs"] = accs
            print(
                f"  digits {layers} layers {method:8s} test acc {row[method]:.4f}  ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
        results["accuracy"][str(layers)] = row
    return results


# --------------------------------------------------------------------------- copy task


def copy_batch(
    length: int, batch: int, bits: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``(T, B, bits + 1)``, targets ``(T, B, bits)`` and a loss mask ``(T, B, 1)``; ``T = 2·length + 1``."""
    seq = (torch.rand(length, batch, bits, generator=g) < 0.5).float()
    total = 2 * length + 1
    x = torch.zeros(total, batch, bits + 1)
    x[:length, :, :bits] = seq
    x[length, :, bits] = 1.0  # delimiter
    y = torch.zeros(total, batch, bits)
    y[length + 1 :] = seq
    mask = torch.zeros(total, batch, 1)
    mask[length + 1 :] = 1.0
    return x, y, mask


class CopyModel(nn.Module):
    def __init__(self, bits: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(bits + 1, hidden)
        self.out = nn.Linear(hidden, bits)


def run_copy(
    method: str,
    window: int,
    steps: int,
    seed: int,
    hidden: int = 64,
    bits: int = 4,
    batch: int = 32,
    sg_lr: float = 1e-3,
) -> dict[str, Any]:
    """Curriculum on the copy length: +1 whenever the mean error drops below 0.15 bits per sequence."""
    torch.manual_seed(seed)
    model = CopyModel(bits, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    iface = None
    if method == "dni":
        synth = LinearDNI(2 * hidden, 2 * hidden, 2 * hidden, num_layers=1)
        iface = BackwardInterface(
            synth, optimizer=torch.optim.Adam(synth.parameters(), lr=sg_lr), scale=0.1, batch_dim=1
        )
    g = torch.Generator().manual_seed(seed + 99)
    length, best, history, errors = 1, 0, [], []
    windows = 0
    while windows < steps:
        x, y, mask = copy_batch(length, batch, bits, g)
        state = (torch.zeros(1, batch, hidden), torch.zeros(1, batch, hidden))
        bit_err = torch.zeros(())
        for start in range(0, x.shape[0], window):
            sl = slice(start, start + window)
            state = tuple(s.detach() for s in state)
            if iface is not None:
                state = iface.trigger(state)
            out, state = model.lstm(x[sl], state)
            logits = model.out(out)
            m = mask[sl]
            loss = (F.binary_cross_entropy_with_logits(logits, y[sl], reduction="none") * m).sum() / batch
            bit_err = bit_err + (((logits > 0).float() != y[sl]).float() * m).sum().detach() / batch
            is_last = start + window >= x.shape[0]
            if iface is not None and not is_last:
                loss = loss + iface.inject(state)
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                opt.step()
            windows += 1
        errors.append(float(bit_err))
        if len(errors) >= 10 and sum(errors[-10:]) / 10 < 0.15:
            best = max(best, length)
            length += 1
            errors = []
            history.append([windows, best])
    return {"max_length": best, "history": history, "windows": windows}


# --------------------------------------------------------------------------- step time


class Floor:
    """What a DNI step cannot avoid: a backprop step plus the synthesizers' own forward, backward and update.

    The synthesizers are copies of ``dni``'s, fed the activations of a real forward pass (and, for cDNI, the
    one-hot labels) and regressed onto fixed targets, stepped by the optimizer the wrapper builds for them.
    ``DNI step / floor`` is the wrapper's own overhead (issue 25, item 4: goal <= 1.25).
    """

    def __init__(self, dni: Trainer, layers: int, width: int, x: torch.Tensor, y: torch.Tensor) -> None:
        import copy

        from altgrad.dni._optim import optimizer_factory

        # The backprop step's Adam is the fused kernel the wrapper's "adam" runs, so that the ratio measures the
        # DNI step, not two implementations of Adam (torch.optim.Adam's default loop costs a small network's
        # step about a third more).
        self.backprop = Trainer("backprop", layers, width, 0, lr=1e-3, sg_lr=1e-4, sg_hidden=256)
        wrapper = dni.model
        assert isinstance(wrapper, DNI)
        self.synths = [copy.deepcopy(iface.synthesizer) for iface in wrapper.interfaces.values()]
        factory = optimizer_factory("adam", 1e-4, "grad_optim")
        assert factory is not None
        self.opt = factory([p for s in self.synths for p in s.parameters()])
        with torch.no_grad():
            h, self.inputs = x, []
            for block in self.backprop.net[:-1]:
                h = block(h)
                context = F.one_hot(y, 10).to(h.dtype) if dni.conditional else None
                self.inputs.append(h if context is None else torch.cat([h, context], 1))
        self.targets = [torch.randn(batch.shape[0], width) * 1e-3 for batch in self.inputs]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.backprop.step(x, y)
        for synth, inp, target in zip(self.synths, self.inputs, self.targets, strict=True):
            pred = synth(inp)[0]
            torch.autograd.backward(pred, (pred.detach() - target) * (2.0 / inp.shape[0]))
        update(self.opt)  # the wrapper's own optimizer step (torch's fused kernel, called directly)


def run_timing(layers: int, width: int, batch: int, min_run_time: float) -> dict[str, Any]:
    xtr, ytr, _, _ = load_digits_split()
    x, y = xtr[:batch], ytr[:batch]
    if len(x) < batch:
        reps = -(-batch // len(x))
        x, y = x.repeat(reps, 1)[:batch], y.repeat(reps)[:batch]
    out: dict[str, Any] = {"layers": layers, "width": width, "batch": batch, "ms": {}}
    timers = {}
    for method in ("backprop", "dni", "cdni"):
        trainer: Trainer | Floor = Trainer(method, layers, width, 0, lr=1e-3, sg_lr=1e-4, sg_hidden=256)
        for name, runner in [(method, trainer)] + (
            [(f"{method}_floor", Floor(trainer, layers, width, x, y))] if method != "backprop" else []
        ):
            for _ in range(5):
                runner.step(x, y)
            timers[name] = benchmark.Timer(
                stmt="runner.step(x, y)",
                globals={"runner": runner, "x": x, "y": y},
                num_threads=torch.get_num_threads(),
            )
    # Interleaved rounds, best median per method: robust to other jobs sharing the machine.
    rounds = 5
    for _ in range(rounds):
        for method, timer in timers.items():
            m = timer.blocked_autorange(min_run_time=min_run_time / rounds)
            out["ms"][method] = min(out["ms"].get(method, float("inf")), m.median * 1e3)
    base = out["ms"]["backprop"]
    out["ratio"] = {k: v / base for k, v in out["ms"].items()}
    # The wrapper's own overhead: a DNI step over its floor (a backprop step plus the synthesizers' work).
    out["over_floor"] = {m: out["ms"][m] / out["ms"][f"{m}_floor"] for m in ("dni", "cdni")}
    return out


# --------------------------------------------------------------------------- report


def print_tables(res: dict[str, Any]) -> None:
    d = res["digits"]
    print(
        f"\nDigits MLP: test accuracy after {d['steps']} steps (batch {d['batch']}, width {d['width']}, mean of {len(d['seeds'])} seeds)"
    )
    print(f"{'layers':>6} | {'backprop':>8} | {'DNI':>6} | {'cDNI':>6} | {'DNI/bp':>6} | {'cDNI/bp':>7}")
    for layers, row in d["accuracy"].items():
        bp = row["backprop"]
        print(
            f"{layers:>6} | {bp:8.4f} | {row['dni']:6.4f} | {row['cdni']:6.4f} | {row['dni'] / bp:6.3f} | {row['cdni'] / bp:7.3f}"
        )
    c = res["copy"]
    print(
        f"\nCopy task: longest length solved (<0.15 bit errors/sequence) in {c['windows']} windows, mean of seeds {c['seeds']}"
    )
    print(f"{'T':>3} | {'TBPTT':>6} | {'DNI':>6} | {'DNI/TBPTT':>9}")
    for t, row in c["max_length"].items():
        ratio = row["dni"] / row["bptt"] if row["bptt"] else float("inf")
        print(f"{t:>3} | {row['bptt']:6.1f} | {row['dni']:6.1f} | {ratio:9.2f}")
    print("\nDNI step over its floor (backprop step + the synthesizers' forward, backward, update)")
    for t in res["timing"]:
        if "over_floor" in t:
            cfg = f"{t['layers']}L w{t['width']} b{t['batch']}"
            print(f"{cfg:>22} | DNI {t['over_floor']['dni']:.3f} | cDNI {t['over_floor']['cdni']:.3f}")
    print("\nStep time (median, ms; ratio to backprop)")
    print(f"{'config':>22} | {'backprop':>8} | {'DNI':>7} | {'cDNI':>7} | {'DNI/bp':>6} | {'cDNI/bp':>7}")
    for t in res["timing"]:
        cfg = f"{t['layers']}L w{t['width']} b{t['batch']}"
        ms, r = t["ms"], t["ratio"]
        print(
            f"{cfg:>22} | {ms['backprop']:8.3f} | {ms['dni']:7.3f} | {ms['cdni']:7.3f} | {r['dni']:6.2f} | {r['cdni']:7.2f}"
        )


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one column of panels with large type: legible at the docs' text width (about 800 px)
    plt.rcParams.update({"font.size": 13, "axes.titlesize": 14, "legend.fontsize": 11})
    fig, axes = plt.subplots(3, 1, figsize=(9, 15))
    d = res["digits"]["accuracy"]
    depths = list(d)
    w = 0.27
    for i, (method, label) in enumerate((("backprop", "backprop"), ("dni", "DNI"), ("cdni", "cDNI"))):
        axes[0].bar(
            [k + (i - 1) * w for k in range(len(depths))], [d[k][method] for k in depths], w, label=label
        )
    axes[0].set_xticks(range(len(depths)), [f"{k} layers" for k in depths])
    lo = min(min(d[k][m] for m in ("backprop", "dni", "cdni")) for k in depths)
    axes[0].set_ylim(max(0.0, lo - 0.05), 1.0)
    axes[0].set_title(f"Digits MLP: test accuracy after {res['digits']['steps']} steps")
    axes[0].legend(ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below: the bars fill the axes
    c = res["copy"]["runs"]
    for key, runs in c.items():
        method, t = key.split("@")
        for j, run in enumerate(runs):
            hist = [[0, 0], *run["history"], [run["windows"], run["max_length"]]]
            xs, ys = zip(*hist)
            axes[1].step(
                xs,
                ys,
                where="post",
                color="C0" if method == "bptt" else "C1",
                linestyle="-" if t == str(res["copy"]["windows_list"][0]) else "--",
                label=f"{'TBPTT' if method == 'bptt' else 'DNI'} T={t}" if j == 0 else None,
                alpha=0.8,
            )
    axes[1].set_xlabel("training windows")
    axes[1].set_ylabel("longest copy length solved")
    axes[1].set_title("Copy task: curriculum progress")
    axes[1].legend()
    labels, dni_r, cdni_r = [], [], []
    for t in res["timing"]:
        labels.append(f"{t['layers']}L w{t['width']}\nb{t['batch']}")
        dni_r.append(t["ratio"]["dni"])
        cdni_r.append(t["ratio"]["cdni"])
    xs = range(len(labels))
    axes[2].bar([x - 0.2 for x in xs], dni_r, 0.4, label="DNI")
    axes[2].bar([x + 0.2 for x in xs], cdni_r, 0.4, label="cDNI")
    axes[2].axhline(1.0, color="k", linewidth=0.8)
    axes[2].axhline(1.5, color="r", linewidth=0.8, linestyle=":", label="1.5× target")
    axes[2].set_xticks(list(xs), labels)
    axes[2].set_ylabel("step time / backprop step time")
    axes[2].set_title("Training step time vs backprop")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write results as JSON to this path")
    parser.add_argument("--plot", help="write a PNG figure to this path")
    parser.add_argument(
        "--plot-only",
        metavar="JSON",
        help="redraw --plot from the results JSON of an earlier run, run nothing",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on shared machines)"
    )
    args = parser.parse_args()
    if args.plot_only:
        if not args.plot:
            parser.error("--plot-only needs --plot")
        with open(args.plot_only) as fh:
            plot(json.load(fh), args.plot)
        print(f"wrote {args.plot} from {args.plot_only}")
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.quick:
        depths, steps, seeds = [3, 6], 300, [0]
        copy_windows, copy_ts, copy_seeds = 1500, [2], [0]
        timing_cfgs, min_run = [(4, 128, 128)], 0.2
    else:
        depths, steps, seeds = [3, 4, 5, 6], 1000, [0]
        copy_windows, copy_ts, copy_seeds = 6000, [2], [0, 1]
        timing_cfgs, min_run = [(4, 128, 128), (4, 512, 256), (6, 1024, 256)], 0.5

    res: dict[str, Any] = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "quick": args.quick,
    }
    print("== digits MLP", flush=True)
    res["digits"] = run_digits(depths, steps, seeds, width=128, batch=64)

    print("== copy task", flush=True)
    copy: dict[str, Any] = {
        "windows": copy_windows,
        "windows_list": copy_ts,
        "seeds": copy_seeds,
        "max_length": {},
        "runs": {},
    }
    for t in copy_ts:
        row = {}
        for method in ("bptt", "dni"):
            t1 = time.perf_counter()
            runs = [run_copy(method, t, copy_windows, seed, sg_lr=3e-3) for seed in copy_seeds]
            copy["runs"][f"{method}@{t}"] = runs
            row[method] = sum(r["max_length"] for r in runs) / len(runs)
            print(
                f"  copy T={t} {method:5s} max length {[r['max_length'] for r in runs]} ({time.perf_counter() - t1:.1f}s)",
                flush=True,
            )
        copy["max_length"][str(t)] = row
    res["copy"] = copy

    print("== step time", flush=True)
    res["timing"] = [run_timing(layers, width, batch, min_run) for layers, width, batch in timing_cfgs]
    res["seconds"] = time.perf_counter() - t0

    print_tables(res)
    print(f"\ntotal {res['seconds']:.0f}s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
