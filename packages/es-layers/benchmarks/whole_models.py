"""Whole-model ES generations (issue 22 §2): es-layers' modes against EvoTorch and a dense vmap baseline.

One generation = sample the population's noise + evaluate every member + write the update and take an SGD step,
for a 2-layer transformer encoder (d = 128, 4 heads, feed-forward 512, sequence 32, a linear head on the mean) and
an LSTM policy (input 8, hidden 256, 64 steps, a linear head on the last state). Each member evaluates the same
one-sequence input; the population ``P`` is ``P / 2`` antithetic pairs in every method.

* ``es-layers <mode>``: ``perturb(model, P / 2, mode)``, ``set_noise``, one batched forward, ``set_grad`` + SGD.
* ``dense vmap``: per-member dense parameters ``θ ± σ ε_k`` (``torch.randn``) and
  ``torch.func.vmap(functional_call)`` over them (the EvoTorch / evosax evaluation, written directly), update
  ``Σ_k w_k ε_k``.
* ``EvoTorch PGPE``: EvoTorch's functional PGPE (``pgpe_ask`` / ``pgpe_tell``, symmetric sampling, ClipUp) with
  ``make_functional_module`` evaluated by ``torch.vmap`` (EvoTorch's functional vmap evaluation).

The methods are measured interleaved (rounds of one generation each, in rotating order) in one process; each
method's time is its median over the rounds. Usage::

    python packages/es-layers/benchmarks/whole_models.py --out docs/es-layers/whole_models.json \\
        --plot docs/es-layers/whole_models.png [--pops 256 1024] [--rounds 5] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

import altgrad.es_layers as es

SIGMA = 0.02
LR = 0.01
GOALS = {"lowrank_vs_dense_vmap": 5.0, "iid_vs_evotorch": 1.2}


class Transformer(nn.Module):
    """2-layer transformer encoder (d = 128, 4 heads, feed-forward 512) with a linear head on the mean."""

    def __init__(self, d: int = 128, heads: int = 4, ff: int = 512, layers: int = 2) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1)).squeeze(-1)


class LSTMPolicy(nn.Module):
    """LSTM (input 8, hidden 256) with a linear head (4 actions) on the last state."""

    def __init__(self, d_in: int = 8, hidden: int = 256, actions: int = 4) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1]).pow(2).sum(-1)


def _fitness_weights(loss: torch.Tensor) -> torch.Tensor:
    """Antithetic pairs, centred ranks: one weight per direction."""
    return es.antithetic_difference(es.centered_ranks(loss))


def _ours(build: Callable[[], nn.Module], x: torch.Tensor, pop: int, mode: str) -> Callable[[], None]:
    model = build()
    pm = es.perturb(model, pop // 2, mode=mode, seed=0, noise_scale=SIGMA, strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xs = x.expand(pop, *x.shape[1:])

    def generation() -> None:
        pm.set_noise()
        with torch.no_grad():
            loss = pm(xs)
        pm.set_grad(_fitness_weights(loss))
        opt.step()

    return generation


def _dense_vmap(build: Callable[[], nn.Module], x: torch.Tensor, pop: int) -> Callable[[], None]:
    model = build()
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    half = pop // 2

    def member(params: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (xi,))

    batched = torch.func.vmap(member, in_dims=(0, None))

    def generation() -> None:
        with torch.no_grad():
            eps = [torch.randn(half, *t.shape) for t in theta]
            params = {n: torch.cat([t + SIGMA * e, t - SIGMA * e]) for n, t, e in zip(names, theta, eps)}
            loss = batched(params, x).reshape(pop)
            w = _fitness_weights(loss)
            for t, e in zip(theta, eps):
                t -= LR * torch.tensordot(w, e, dims=1)

    return generation


def _evotorch(build: Callable[[], nn.Module], x: torch.Tensor, pop: int) -> Callable[[], None]:
    from evotorch.algorithms.functional import pgpe, pgpe_ask, pgpe_tell
    from evotorch.neuroevolution.net import make_functional_module

    model = build()
    fnet = make_functional_module(model, disable_autograd_tracking=True)
    center = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    state = [
        pgpe(
            center_init=center,
            center_learning_rate=LR,
            stdev_learning_rate=0.1,
            objective_sense="min",
            stdev_init=SIGMA,
            symmetric=True,
        )
    ]
    evaluate = torch.vmap(fnet, in_dims=(0, None))

    def generation() -> None:
        with torch.no_grad():
            values = pgpe_ask(state[0], popsize=pop)
            loss = evaluate(values, x).reshape(pop)
            state[0] = pgpe_tell(state[0], values, loss)

    return generation


class LoopLSTMPolicy(LSTMPolicy):
    """The same policy with the LSTM written as a time loop of ``F.linear`` (vmap has no batching rule for
    ``aten::lstm``, so the dense vmap and EvoTorch peers evaluate this equivalent form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lstm = self.lstm
        h = c = x.new_zeros(x.shape[0], lstm.hidden_size)
        gx = torch.nn.functional.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0)
        for t in range(x.shape[1]):
            gates = gx[:, t] + torch.nn.functional.linear(h, lstm.weight_hh_l0, lstm.bias_hh_l0)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h).pow(2).sum(-1)


#: name -> (model for es-layers, the same function for the vmap peers, input)
MODELS = {
    "transformer": (Transformer, Transformer, lambda: torch.randn(1, 32, 128)),
    "lstm": (LSTMPolicy, LoopLSTMPolicy, lambda: torch.randn(1, 64, 8)),
}


def run(models: list[str], pops: list[int], rounds: int, modes: list[str], log=print) -> list[dict]:
    """Median seconds per generation of every method, measured interleaved; one record per (model, pop)."""
    records = []
    for name in models:
        build, build_peer, make_x = MODELS[name]
        for pop in pops:
            torch.manual_seed(0)
            x = make_x()
            methods: dict[str, Callable[[], None]] = {
                f"es-layers {m}": _ours(build, x, pop, m) for m in modes
            }
            methods["dense vmap"] = _dense_vmap(build_peer, x, pop)
            try:
                methods["EvoTorch PGPE"] = _evotorch(build_peer, x, pop)
            except ImportError as exc:  # evotorch is in the dev venv, not a dependency
                log(f"  no EvoTorch: {exc}")
            times: dict[str, list[float]] = {k: [] for k in methods}
            for fn in methods.values():  # warm-up (allocations, vmap tracing)
                fn()
            order = list(methods)
            for r in range(rounds):
                for k in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
                    t0 = time.perf_counter()
                    methods[k]()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rec = {"model": name, "population": pop, "seconds": med, "all_seconds": times}
            records.append(rec)
            log(f"{name} P={pop}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()))
    return records


def _ratio(rec: dict, slow: str, fast: str) -> float | None:
    s = rec["seconds"]
    return s[slow] / s[fast] if slow in s and fast in s else None


def table(records: list[dict]) -> str:
    """Markdown: ms per generation and the two goal ratios."""
    methods = list(records[0]["seconds"])
    head = "| model | P | " + " | ".join(methods) + " | dense vmap / low-rank | EvoTorch / iid |"
    lines = [head, "|:--|--:|" + "--:|" * (len(methods) + 2)]
    for rec in records:
        cells = [f"{rec['seconds'][m] * 1e3:.0f}" for m in methods]
        r1 = _ratio(rec, "dense vmap", "es-layers lowrank")
        r2 = _ratio(rec, "EvoTorch PGPE", "es-layers iid")
        fmt = lambda r: "-" if r is None else f"{r:.1f}x"  # noqa: E731
        lines.append(
            f"| {rec['model']} | {rec['population']} | " + " | ".join(cells) + f" | {fmt(r1)} | {fmt(r2)} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], env: dict, path: str) -> None:
    """Bars of ms per generation (log scale), one group per (model, population)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 13})
    methods = list(records[0]["seconds"])
    fig, ax = plt.subplots(figsize=(10, 6))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(records))]
        ax.bar(xs, [r["seconds"].get(m, float("nan")) * 1e3 for r in records], width, label=m)
    labels = [f"{r['model']}\nP={r['population']}" for r in records]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))], labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per generation (sample + evaluate + update)")
    ax.set_title(f"One ES generation, {env['threads']} CPU threads, {env['device_name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pops", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--modes", nargs="+", default=["lowrank", "iid", "flipout"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="population 32 and 2 rounds (a smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pops, rounds = ([32], 2) if args.quick else (args.pops, args.rounds)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device_name": platform.processor() or "CPU",
        "threads": torch.get_num_threads(),
        "command": "python packages/es-layers/benchmarks/whole_models.py " + " ".join(argv or sys.argv[1:]),
    }
    print(f"whole-model ES generations: {env}", flush=True)
    records = run(args.models, pops, rounds, args.modes, log=lambda m: print(m, flush=True))
    print()
    print(table(records))
    result = {"env": env, "goals": GOALS, "records": records}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.plot:
        plot(records, env, args.plot)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
