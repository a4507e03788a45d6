"""Two CPU processes (gloo) shard the population; parameters must equal the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import altgrad.es_layers as es

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORKER = textwrap.dedent(
    """
    import os, sys, datetime
    import torch
    from torch import nn
    import altgrad.es_layers as es

    rank, world, out, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    N = 11  # uneven split over 2 ranks: 6 + 5
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)  # same initial parameters everywhere
    net = nn.Sequential(
        es.PermutedConv2d(2, 4, 3, N, padding=1, in_sparsity=1),
        nn.ReLU(),
        es.FlipoutConv2d(4, 4, 3, N, flip="both"),
        nn.Flatten(),
        es.LowRankLinear(4 * 3 * 3, 8, N, rank=2),
        nn.Tanh(),
        es.PerturbedLinear(8, 6, N),
        nn.Tanh(),
        es.SparsePerturbedLinear(6, 6, N, sparsity=2),
        nn.Tanh(),
        es.PermutedLinear(6, 1, N, permutation="in"),
    )
    seed = es.broadcast_seed(1234) if world > 1 else 1234
    pm = es.PerturbedModel(net, N, seed=seed)
    pm.set_noise_scale(0.05)
    members = es.shard(pm) if world > 1 else range(N)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x_full = torch.randn(2, N, 2, 5, 5, generator=g)  # (repeats, members, C, H, W), antithetic pair
        x_full[1] = x_full[0]
        x = x_full[:, list(members)].flatten(0, 1)
        pm.set_noise()
        with torch.no_grad():
            loss = pm(x).view(2, len(members)).pow(2)
        local = loss[0] - loss[1]  # antithetic difference per local member
        fitness = es.all_gather_fitness(local, pm) if world > 1 else local
        opt.zero_grad()
        pm.set_grad(es.centered_ranks(fitness))
        opt.step()
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    """
)


def _run(script, tmp_path, world):
    init = f"file://{tmp_path / 'store'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), str(tmp_path / f"w{world}r{r}.pt"), init],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world)
    ]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [torch.load(tmp_path / f"w{world}r{r}.pt", weights_only=True) for r in range(world)]


def test_two_processes_equal_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (single,) = _run(script, tmp_path, 1)
    rank0, rank1 = _run(script, tmp_path, 2)
    for name, value in single.items():
        # exact: every rank regenerates the same noise and applies the same update on the same kernels (1 thread)
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], value), name  # exact: and the single-process run takes the same route


MISMATCH_WORKER = textwrap.dedent(
    """
    import datetime, json, sys
    import torch
    from torch import nn
    import torch.distributed as dist
    import altgrad.es_layers as es

    rank, out, init = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    N = 5
    torch.manual_seed(0)
    pm = es.PerturbedModel(nn.Sequential(es.LowRankLinear(3, 2, N), nn.Tanh(), es.PerturbedLinear(2, 1, N)), N, seed=7)
    members = es.shard(pm)
    local = torch.arange(len(members), dtype=torch.float64) + 10 * members.start
    results = {}

    def attempt(name, fn):
        try:
            value = fn()
            results[name] = ["ok", value.tolist()]
        except Exception as e:
            results[name] = [type(e).__name__, str(e)]

    gather = lambda: es.all_gather_fitness(local, pm)
    pm.set_noise()
    attempt("matched", gather)
    pm.set_noise()
    if rank == 1:
        pm.set_noise()  # rank 1 skipped ahead: one step further than rank 0
    attempt("step_ahead", gather)
    if rank == 0:
        pm.set_noise()  # both at step 2 again
    attempt("realigned", gather)
    pm.set_noise(0.02 if rank == 1 else None)  # sigma differs on rank 1 at step 3
    attempt("sigma", gather)
    pm.set_noise_scale(0.01)
    pm.set_seed(7 + rank)
    pm.set_noise(step=4)
    attempt("seed", gather)
    pm.set_seed(7)
    pm.set_noise(step=5)
    attempt("rows", lambda: es.all_gather_fitness(local[:-1] if rank else local, pm))  # rank 1: wrong rows
    attempt("indices_step", lambda: es.all_gather_fitness(local, members, N, step=5 + rank))
    attempt("final", gather)
    # broadcast_seed: the source's seed everywhere; paired with all_gather_fitness, or with another src on one
    # rank, every rank raises (it used to broadcast one int64 against the other's header)
    attempt("seed_ok", lambda: torch.tensor(es.broadcast_seed(1234 + rank, src=1)))
    attempt("seed_vs_gather", (lambda: torch.tensor(es.broadcast_seed(5))) if rank == 0 else gather)
    attempt("seed_src", lambda: torch.tensor(es.broadcast_seed(5, src=rank)))
    attempt("seed_bad_src", lambda: torch.tensor(es.broadcast_seed(5, src=2 if rank else 0)))
    attempt("after_seed", gather)
    with open(out, "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_all_gather_fitness_checks_step_and_settings_on_every_rank(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'store'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(tmp_path / f"r{r}.json"), init],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(2)
    ]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    res = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    full = [0.0, 1.0, 2.0, 30.0, 31.0]  # members 0-2 on rank 0, 3-4 on rank 1 (local value + 10 * start)
    for r in range(2):
        for name in ("matched", "realigned", "final"):
            assert res[r][name] == ["ok", full], (r, name)
        kind, msg = res[r]["step_ahead"]
        assert kind == "RankMismatchError"
        assert "noise step" in msg
        assert "rank 0: 1, rank 1: 2" in msg
        for name in ("sigma", "seed"):
            kind, msg = res[r][name]
            assert kind == "RankMismatchError", (r, name, msg)
            assert ("settings" if name == "sigma" else "seed") in msg
        kind, msg = res[r]["indices_step"]
        assert kind == "RankMismatchError"
        assert "rank 0: 5, rank 1: 6" in msg
        assert res[r]["seed_ok"] == ["ok", 1235]  # rank 1's seed
        kind, msg = res[r]["seed_vs_gather"]
        assert kind == "RankMismatchError", (r, msg)
        assert ("another collective" in msg) if r == 0 else ("paired with all_gather_fitness" in msg)
        kind, msg = res[r]["seed_src"]
        assert kind == "RankMismatchError", (r, msg)
        assert "rank 0: 0, rank 1: 1" in msg
        kind, msg = res[r]["seed_bad_src"]
        assert kind == "ValueError", (r, msg)
        assert "rank(s) [1]" in msg
        assert res[r]["after_seed"] == ["ok", full]  # nothing was left half-exchanged
    assert res[1]["rows"][0] == "ValueError"
    assert "one row per local member" in res[1]["rows"][1]
    assert res[0]["rows"][0] == "RankMismatchError"
    assert "rank(s) [1]" in res[0]["rows"][1]


def test_shard_members_partition():
    parts = [es.shard_members(11, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sorted(m for p in parts for m in p) == list(range(11))
    assert list(es.shard_members(2, 2, 3)) == []
    with pytest.raises(ValueError, match="rank"):
        es.shard_members(4, 3, 3)
    with pytest.raises(ValueError, match="world_size"):
        es.shard_members(4, 0, 0)


def test_collectives_need_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        es.all_gather_fitness(torch.ones(2), [0, 1], 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        es.broadcast_seed(1)


def test_single_rank_gather_roundtrip(tmp_path):
    # a 1-process gloo group exercises the gather/validation logic in-process
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store1'}", rank=0, world_size=1)
    try:
        f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        out = es.all_gather_fitness(f, [2, 0, 1], 3)
        assert torch.equal(out, f[[1, 2, 0]])  # exact: the gather only copies values
        assert es.broadcast_seed(99) == 99
        with pytest.raises(ValueError, match="cover"):
            es.all_gather_fitness(f, [0, 1, 1], 3)
        with pytest.raises(ValueError, match="one row per local member"):
            es.all_gather_fitness(f, [0, 1], 3)
        net = torch.nn.Sequential(es.LowRankLinear(2, 2, 5))
        pm = es.PerturbedModel(net, 5)
        assert es.shard(pm) == range(5)
    finally:
        dist.destroy_process_group()
