"""Faults and restarts: a failed call leaves no trace; a checkpoint restores the noise position exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from torch import nn

import altgrad.es_layers as es
from altgrad.es_layers import noise as es_noise


def _net(n: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        es.PerturbedLinear(4, 6, n),
        nn.Tanh(),
        es.LowRankLinear(6, 5, n, rank=2),
        nn.Tanh(),
        es.FlipoutLinear(5, 1, n),
    )


def _failing_sampler(fail_at: int, probe=None):
    """A ``sample_normal`` that raises ``MemoryError`` on its ``fail_at``-th call (0-based)."""
    real = es_noise.sample_normal
    calls = {"n": 0}

    def sampler(*args, **kwargs):
        if calls["n"] == fail_at:
            if probe is not None:
                probe()
            raise MemoryError("injected allocation failure")
        calls["n"] += 1
        return real(*args, **kwargs)

    return sampler


def test_iid_set_noise_frees_old_noise_and_keeps_step_on_failure(monkeypatch):
    layer = es.PerturbedLinear(4, 3, 6, seed=1)
    layer.set_noise()
    layer.perturbed_flag = True
    x = torch.randn(12, 4)
    with torch.no_grad():
        y0 = layer(x)
    old = weakref.ref(layer._noise["weight"])
    seen = {}
    monkeypatch.setattr(
        es_noise, "sample_normal", _failing_sampler(0, lambda: seen.update(old_alive=old() is not None))
    )
    with pytest.raises(MemoryError):
        layer.set_noise(0.5)
    monkeypatch.undo()
    assert seen == {"old_alive": False}  # the old noise was released before the new one was drawn
    assert layer.step == 0
    assert layer.noise_scale == 0.01  # exact: the stored Python float, untouched by the failed call
    with torch.no_grad():
        y1 = layer(x)
    # exact: same kernels, step 0's noise regenerated from the same (seed, step, layer, member)
    assert torch.equal(y1, y0)
    layer.set_noise()
    ref = es.PerturbedLinear(4, 3, 6, seed=1)
    ref.load_state_dict(layer.state_dict())
    ref.set_noise()
    ref.set_noise()
    assert layer.step == ref.step == 1  # the failed call consumed no step
    e, _ = layer.dense_noise()
    e_ref, _ = ref.dense_noise()
    assert torch.equal(e, e_ref)  # exact: same generator route, same key


def test_model_set_noise_failure_rolls_back_every_layer(monkeypatch):
    n = 4
    pm = es.PerturbedModel(_net(n), n, seed=3)
    pm.set_noise()
    x = torch.randn(2 * n, 4)
    with torch.no_grad():
        y0 = pm(x)
    # calls: layer 0 weight, layer 0 bias, layer 1 A, layer 1 B -> fail in layer 1 after layer 0 moved on
    monkeypatch.setattr(es_noise, "sample_normal", _failing_sampler(3))
    with pytest.raises(MemoryError):
        pm.set_noise()
    monkeypatch.undo()
    assert [layer.step for layer in pm.perturbed_layers] == [0, 0, 0]
    with torch.no_grad():
        y1 = pm(x)
    assert torch.equal(y1, y0)  # exact: same route, step 0's noise regenerated in every layer
    pm.set_noise()
    ref = es.PerturbedModel(_net(n), n, seed=3)
    ref.set_noise()
    ref.set_noise()
    with torch.no_grad():
        assert torch.equal(pm(x), ref(x))  # exact: same model, seed and step 1 on both


def _snapshot(pm: es.PerturbedModel) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in pm.state_dict().items()}
    for name, p in pm.model.named_parameters():
        out["grad:" + name] = torch.full((1,), float("nan")) if p.grad is None else p.grad.clone()
    out["flags"] = torch.tensor([layer.perturbed_flag for layer in pm.perturbed_layers])
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # exact: nothing may have been written; NaN marks a missing .grad on both sides
        assert torch.equal(a[k], b[k]) or (a[k].isnan().all() and b[k].isnan().all()), k


class _Boom(nn.Module):
    armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("injected forward failure")
        return x


def test_failed_calls_leave_no_trace(monkeypatch):
    n = 4
    net = _net(n)
    boom = _Boom()
    net.insert(2, boom)
    pm = es.PerturbedModel(net, n, seed=5)
    pm.set_noise()
    with torch.no_grad():
        pm(torch.randn(2 * n, 4))
    pm.set_grad(torch.randn(n))
    before = _snapshot(pm)

    boom.armed = True
    with pytest.raises(RuntimeError, match="injected forward"):
        pm(torch.randn(2 * n, 4))
    boom.armed = False
    _assert_same(_snapshot(pm), before)

    # the update of the last layer fails after the first layers computed theirs: no .grad is written
    last = pm.perturbed_layers[-1]
    monkeypatch.setattr(last, "_weighted_sum", lambda *a: (_ for _ in ()).throw(MemoryError("injected")))
    for call in (pm.set_grad, pm.update, pm.es_grads):
        with pytest.raises(MemoryError):
            call(torch.randn(n))
        _assert_same(_snapshot(pm), before)
    monkeypatch.undo()

    bad = pm.state_dict()
    bad["es_layers:1.step"] = torch.tensor(-7)
    with pytest.raises(ValueError, match="layer 1"):
        pm.load_state_dict(bad)
    _assert_same(_snapshot(pm), before)
    bad = pm.state_dict()
    bad["0.weight"] = torch.zeros(6, 5)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        pm.load_state_dict(bad)
    _assert_same(_snapshot(pm), before)


def test_state_dict_round_trip_and_refusals():
    n = 4
    pm = es.PerturbedModel(_net(n), n)  # random seed
    pm.set_noise_scale(0.05)
    pm.set_noise()
    pm.set_noise()
    sd = pm.state_dict()
    other = es.PerturbedModel(_net(n), n)
    assert other.seed != pm.seed
    other.load_state_dict(sd)
    assert other.seed == pm.seed
    for a, b in zip(pm.perturbed_layers, other.perturbed_layers):
        assert a.noise_position() == b.noise_position()
    x = torch.randn(2 * n, 4)
    with torch.no_grad():
        assert torch.equal(pm(x), other(x))  # exact: same route, restored position and weights
    # a plain model's state_dict: strict refuses (it has no noise position), strict=False loads the weights only
    with pytest.raises(ValueError, match="no 'es_layers:' entries"):
        other.load_state_dict(pm.model.state_dict())
    other.load_state_dict(pm.model.state_dict(), strict=False)
    # another configuration is refused
    wrong = es.PerturbedModel(
        nn.Sequential(es.PerturbedLinear(4, 6, n), nn.Tanh(), es.LowRankLinear(6, 5, n, rank=1), nn.Tanh(),
                      es.FlipoutLinear(5, 1, n)),
        n,
    )  # fmt: skip
    with pytest.raises(ValueError, match="layer 1 was saved with another configuration"):
        wrong.load_state_dict(sd)
    # seeds beyond 64 bits are stored modulo 2**64, which gives the same noise
    pm.set_seed(2**70 + 12345)
    pm.set_noise(step=3)
    other.load_state_dict(pm.state_dict())
    assert other.seed == 12345
    a, _ = pm.perturbed_layers[0].dense_noise()
    b, _ = other.perturbed_layers[0].dense_noise()
    assert torch.equal(a, b)  # exact: the sampler reduces the seed modulo 2**64


RUN = textwrap.dedent(
    """
    import torch
    from torch import nn
    import altgrad.es_layers as es

    N = 6

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(
            es.PerturbedLinear(3, 8, N), nn.Tanh(), es.LowRankLinear(8, 8, N, rank=2), nn.Tanh(),
            es.PermutedLinear(8, 8, N), nn.Tanh(), es.FlipoutLinear(8, 1, N),
        )
        pm = es.PerturbedModel(net, N)  # seed=None: a fresh random seed in every process
        return pm, torch.optim.Adam(net.parameters(), lr=0.05)

    def finish_step(pm, opt):
        x = torch.randn(2 * N, 3, generator=torch.Generator().manual_seed(pm.step))
        with torch.no_grad():
            loss = (pm(x) - 1).pow(2).view(2, N)
        opt.zero_grad()
        pm.set_grad(es.centered_ranks(loss[0] - loss[1]))
        opt.step()

    def params(pm):
        return {k: v.clone() for k, v in pm.model.state_dict().items()}
    """
)

RESUME = textwrap.dedent(
    """
    import sys
    torch.set_num_threads(1)
    pm, opt = build()
    seed_before = pm.seed
    ck = torch.load(sys.argv[1], weights_only=True)
    pm.load_state_dict(ck["pm"])
    opt.load_state_dict(ck["opt"])
    assert pm.seed != seed_before
    finish_step(pm, opt)  # the checkpoint was taken after set_noise() of step 3
    for _ in range(2):
        pm.set_noise()
        finish_step(pm, opt)
    torch.save(params(pm), sys.argv[2])
    """
)


def test_resume_in_new_process_is_bit_identical(tmp_path):
    ns: dict = {}
    exec(RUN, ns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pm, opt = ns["build"]()
        pm.set_noise_scale(0.05)
        for _ in range(3):
            pm.set_noise()
            ns["finish_step"](pm, opt)
        pm.set_noise()  # step 3 drawn, not yet evaluated
        torch.save({"pm": pm.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
        ns["finish_step"](pm, opt)
        for _ in range(2):
            pm.set_noise()
            ns["finish_step"](pm, opt)
        uninterrupted = ns["params"](pm)
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "resume.py"
    script.write_text(RUN + RESUME)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():
        # exact: same kernels at one thread, noise position and Adam state restored from the checkpoint
        assert torch.equal(resumed[k], v), k
    start = ns["build"]()[0]
    # exact: any change at all shows that training moved the weight
    assert not torch.equal(
        start.model.state_dict()["0.weight"], uninterrupted["0.weight"]
    )  # training moved it
