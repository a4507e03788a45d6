"""Worker for test_distributed: one process of a 2-rank gloo group (spawned; importable via sys.path)."""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import altgrad.zero_order as zo
from altgrad.zero_order import ZeroOrderGradientModule, estimate_gradient, zero_order

N, SIGMA, CHUNK = 12, 0.05, 5
TABLE_CHUNK = 8  # 4 directions per chunk: rank 1's block (6..11) starts inside a chunk


def mlp_params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) * 0.3 for s in [(16, 6), (16,), (1, 16), (1,)]]


def data():
    return (
        torch.randn(10, 6, generator=torch.Generator().manual_seed(1)),
        torch.randn(10, 1, generator=torch.Generator().manual_seed(2)),
    )


def mlp_loss(w1, b1, w2, b2, x, y):
    return F.mse_loss(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)


class Net(ZeroOrderGradientModule, method="antithetic", num_samples=N, sigma=SIGMA, chunk_size=CHUNK):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        with torch.no_grad():
            for p, v in zip(self.parameters(), mlp_params()):
                p.copy_(v)
        self.noise = zo.SeededNormal(4)

    def forward(self, x, y):
        return F.mse_loss(self.net(x), y)

    def sample(self, sample_shape=torch.Size()):  # noqa: B008
        return torch.randn(sample_shape)

    def zero_order_distribution(self):
        return self.noise


def _error(fn, *also):
    try:
        fn()
    except (ValueError, TypeError, *also) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    pg = dist.group.WORLD
    x, y = data()
    params = mlp_params()
    fn = lambda *p: mlp_loss(*p, x, y)  # noqa: E731
    out = {}
    for method in zo.METHODS:
        kw = {"top_k": 5} if method == "ars" else {}
        single = estimate_gradient(fn, params, zo.SeededNormal(4), method, N, SIGMA, chunk_size=CHUNK, **kw)
        multi = estimate_gradient(
            fn, params, zo.SeededNormal(4), method, N, SIGMA, chunk_size=CHUNK, process_group=pg, **kw
        )
        out[("estimate_gradient", method)] = (single, multi)
    for directions in ("lowrank", "flipout"):
        kw = {"directions": directions, "rank": 2}
        single = estimate_gradient(
            fn, params, zo.SeededNormal(4), "antithetic", N, SIGMA, chunk_size=CHUNK, **kw
        )
        multi = estimate_gradient(
            fn, params, zo.SeededNormal(4), "antithetic", N, SIGMA, chunk_size=CHUNK, process_group=pg, **kw
        )
        out[("estimate_gradient", directions)] = (single, multi)
    # the decorator and the module (antithetic), through autograd
    leaves = tuple(p.clone().requires_grad_() for p in params)
    deco = zero_order(zo.SeededNormal(4), "antithetic", 0, N, SIGMA, chunk_size=CHUNK, process_group=pg)(
        lambda ps, x, y: mlp_loss(*ps, x, y)
    )
    out[("zero_order", "antithetic")] = (None, torch.autograd.grad(deco(leaves, x, y), leaves))
    dist_net = type("DistNet", (Net,), {}, process_group=pg)()
    dist_net(x, y).backward()
    out[("module", "antithetic")] = (None, tuple(p.grad for p in dist_net.parameters()))
    # bad input: a user distribution, num_samples differing across ranks, an empty block
    out["user-distribution"] = _error(
        lambda: zero_order(torch.distributions.Normal(0.0, 1.0), process_group=pg)
    )
    out["mismatch"] = _error(
        lambda: estimate_gradient(
            fn, params, zo.SeededNormal(4), "naive", 6 + 2 * rank, SIGMA, process_group=pg
        )
    )
    out["empty"] = _error(
        lambda: estimate_gradient(fn, params, zo.SeededNormal(4), "naive", 1, SIGMA, process_group=pg)
    )
    out["module-user-distribution"] = _error(
        lambda: type(
            "UserDist", (Net,), {"zero_order_distribution": lambda self: self.sample}, process_group=pg
        )()(x, y).backward()
    )
    # NoiseTable (windows keyed by the single process's chunks): the same estimate as one process
    table = lambda: zo.NoiseTable(4, size=1 << 10)  # noqa: E731
    single = estimate_gradient(fn, params, table(), "antithetic", N, SIGMA, chunk_size=TABLE_CHUNK)
    multi = estimate_gradient(
        fn, params, table(), "antithetic", N, SIGMA, chunk_size=TABLE_CHUNK, process_group=pg
    )
    out[("estimate_gradient", "noise-table")] = (single, multi)
    # settings that change the estimate, differing on rank 1: refused on every rank
    for name, kw in {
        "directions": {"directions": ("dense", "lowrank")[rank]},
        "rank": {"directions": "lowrank", "rank": 1 + rank},
        "top_k": {"method": "ars", "top_k": 3 + rank},
        "grad_output": {"grad_output": 1.0 + rank},
    }.items():
        kw = {"method": "antithetic", **kw}
        out[("differs", name)] = _error(
            lambda kw=kw: estimate_gradient(
                fn, params, zo.SeededNormal(4), num_samples=N, sigma=SIGMA, process_group=pg, **kw
            )
        )
    # rank 1's function raises during its block: every rank raises; nothing consumed; the retry is the normal run
    noise = zo.SeededNormal(4)
    fail = {"once": rank == 1}

    def flaky(*p):
        if fail["once"]:
            fail["once"] = False
            raise ValueError("bad batch")
        return fn(*p)

    out["failed"] = _error(
        lambda: estimate_gradient(
            flaky, params, noise, "antithetic", N, SIGMA, chunk_size=CHUNK, process_group=pg
        ),
        RuntimeError,
    )
    out["failed-step"] = noise.step
    out["retry"] = estimate_gradient(
        flaky, params, noise, "antithetic", N, SIGMA, chunk_size=CHUNK, process_group=pg
    )
    out["retry-step"] = noise.step
    # a rank one message out of step (its settings against the other's values): both raise, nothing is paired
    from altgrad.zero_order import gradient

    kind = (gradient._VALUES, gradient._SETTINGS)[rank]
    out["out-of-step"] = _error(
        lambda: gradient._exchange(pg, torch.device("cpu"), kind, 0, torch.zeros(3, dtype=torch.int64)),
        RuntimeError,
    )
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    # Leave together: without the barrier a rank that tears gloo down while its peer is still finishing the last
    # exchange aborted at exit now and then ("terminate called without an active exception", 3-7 runs in 50 here;
    # 0 in 100 with it)
    dist.barrier()
    dist.destroy_process_group()
