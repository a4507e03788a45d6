"""Faults and restarts (issue 23): a failed estimate leaves no trace, a checkpoint holds the noise position, and
``batching="auto"`` falls back to the loop only on what vmap cannot batch."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import altgrad.zero_order as zo
from altgrad.zero_order import VmapFallbackWarning, ZeroOrderGradientModule, estimate_gradient, zero_order
from altgrad.zero_order.population import PopulationEvaluator

X = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randn(12, 1, generator=torch.Generator().manual_seed(2))


class Net(ZeroOrderGradientModule, method="antithetic", num_samples=6, sigma=0.1):
    def __init__(self, fail=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.noise = zo.SeededNormal(7)
        self.fail = fail  # raised by the first perturbed member, once
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        if self.fail is not None and self.calls > 1:  # call 1 is the unperturbed forward
            error, self.fail = self.fail, None
            raise error
        return F.mse_loss(self.body(x), y)

    def sample(self, sample_shape=torch.Size()):  # noqa: B008
        return torch.randn(sample_shape)

    def zero_order_distribution(self):
        return self.noise


@pytest.mark.parametrize("memory", ["batched", "inference"])
@pytest.mark.parametrize("error", [ValueError("bad batch"), KeyboardInterrupt()])
def test_failed_module_estimate_consumes_no_step(error, memory):
    cls = type("Inference", (Net,), {}, memory="inference") if memory == "inference" else Net
    reference, failing = cls(), cls(fail=error)
    reference(X, Y).backward()
    with pytest.raises(type(error)):
        failing(X, Y).backward()
    assert failing.noise.step == 0
    assert all(p.grad is None for p in failing.parameters())
    failing(X, Y).backward()  # the retry
    for a, b in zip(failing.parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad)  # exact: the same estimate (step 0) by the same route


@pytest.mark.parametrize("memory", ["batched", "inference"])
@pytest.mark.parametrize("error", [ValueError("bad batch"), KeyboardInterrupt()])
@pytest.mark.parametrize("api", ["zero_order", "estimate_gradient"])
def test_failed_functional_estimate_consumes_no_step(error, api, memory):
    state = {"fail": None, "calls": 0}
    first_member = 1 if api == "zero_order" else 0  # the decorator evaluates f(θ) first

    def loss(w):
        state["calls"] += 1
        if state["fail"] is not None and state["calls"] > first_member:
            err, state["fail"] = state["fail"], None
            raise err
        return (w * torch.arange(1.0, 4.0)).square().sum()

    def run(noise):
        state["calls"] = 0
        w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
        if api == "estimate_gradient":
            return estimate_gradient(loss, [w.detach()], noise, "antithetic", 5, 0.1, memory=memory)[0]
        deco = zero_order(noise, "antithetic", num_samples=5, sigma=0.1, memory=memory)
        return torch.autograd.grad(deco(loss)(w), w)[0]

    want = run(zo.SeededNormal(3))
    noise = zo.SeededNormal(3)
    state["fail"] = error
    with pytest.raises(type(error)):
        run(noise)
    assert noise.step == 0
    assert torch.equal(run(noise), want)  # exact: the retry is the same estimate by the same route
    assert noise.step == 1


def test_seeded_distribution_state_dict_round_trip():
    d = zo.NoiseTable(3, size=64)
    d.next_step(), d.next_step()
    state = d.state_dict()
    assert state == {"seed": 3, "step": 2, "size": 64}
    other = zo.NoiseTable(0, size=32)
    other.load_state_dict(state)
    assert (other.seed, other.step, other.size) == (3, 2, 64)
    assert torch.equal(other.table(), d.table())  # exact: the same seed regenerates the same table
    with pytest.raises(TypeError, match="step"):
        zo.SeededNormal(0).load_state_dict({"seed": 1, "step": 1.5})
    with pytest.raises(ValueError, match="step"):
        zo.SeededNormal(0).load_state_dict({"seed": 1, "step": -1})


_RESUME = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_faults import Net, X, Y
torch.set_num_threads(1)
net = Net()
opt = torch.optim.Adam(net.parameters(), lr=0.01)
state = torch.load({path!r}, weights_only=True)
net.load_state_dict(state["model"])
opt.load_state_dict(state["opt"])
for _ in range(3):
    opt.zero_grad()
    net(X, Y).backward()
    opt.step()
torch.save({{"params": [p.detach() for p in net.parameters()], "step": net.noise.step}}, {out!r})
"""


def test_resume_in_a_new_process_continues_bit_identically(tmp_path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = Net()
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        for i in range(6):
            if i == 3:
                torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
            opt.zero_grad()
            net(X, Y).backward()
            opt.step()
    finally:
        torch.set_num_threads(old)
    assert net.state_dict()["_extra_state"] == {"distribution": {"seed": 7, "step": 6}}
    code = _RESUME.format(
        tests=os.path.dirname(__file__), path=str(tmp_path / "ckpt.pt"), out=str(tmp_path / "out.pt")
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert resumed["step"] == 6
    for a, b in zip(resumed["params"], net.parameters()):
        assert torch.equal(a, b)  # exact: the same steps from the same state, one thread, the same build


def test_state_of_a_seeded_position_needs_a_seeded_distribution():
    class Unseeded(Net):
        def zero_order_distribution(self):
            return self.sample

    assert Unseeded().state_dict()["_extra_state"] == {}
    with pytest.raises(TypeError, match="seeded distribution"):
        Unseeded().load_state_dict(Net().state_dict())


def test_auto_lets_user_errors_through_and_keeps_vmap():
    state = {"fail": True}

    def f(w):
        if state["fail"]:
            state["fail"] = False
            raise ValueError("user error")
        return (w**2).sum()

    ev = PopulationEvaluator(f, "auto")
    with pytest.raises(ValueError, match="user error"):
        ev([torch.ones(4, 3)])
    assert ev.resolved is None  # nothing decided: the next call tries vmap again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev([torch.ones(4, 3)])
    assert ev.resolved == "vmap"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000 bytes."),
        torch.OutOfMemoryError("CUDA out of memory."),
        MemoryError(),
    ],
)
def test_auto_lets_allocation_failures_through(error):
    state = {"fail": False}

    def f(w):
        if state["fail"]:  # in the vmap attempt of the estimate
            state["fail"] = False
            raise error
        return (w**2).sum()

    @zero_order(zo.SeededNormal(0), num_samples=4)
    def loss(w):
        return f(w)

    w = torch.ones(3, requires_grad=True)
    value = loss(w)
    state["fail"] = True
    with pytest.raises(type(error)):
        value.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: vmap again, no warning
        loss(w).backward()
    assert torch.isfinite(w.grad).all()


def test_auto_falls_back_once_with_a_warning_naming_the_cause():
    def f(w):
        return w.sum() * (1.0 if w.sum().item() > 0 else 2.0)  # .item(): vmap cannot batch it

    @zero_order(zo.SeededNormal(0), num_samples=4)
    def loss(w):
        return f(w)

    w = torch.ones(3, requires_grad=True)
    with pytest.warns(
        VmapFallbackWarning, match=r"cannot batch this function \(RuntimeError: vmap: .*item\(\)"
    ):
        loss(w).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the loop is remembered for this function
        loss(w).backward()


def test_auto_shape_error_of_a_real_bug_is_raised():
    # A RuntimeError that does not name vmap is checked on one member without vmap: a real bug raises there.
    ev = PopulationEvaluator(lambda w: (w @ torch.ones(4)).sum(), "auto")
    with pytest.raises(RuntimeError, match=r"shape|size"):
        ev([torch.ones(4, 3)])
    assert ev.resolved is None


def test_auto_one_off_runtime_error_is_raised_not_taken_for_a_vmap_limitation():
    state = {"fail": True}

    def f(w):
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("a transient failure")
        return (w**2).sum()

    ev = PopulationEvaluator(f, "auto")
    with pytest.raises(RuntimeError, match="transient"):
        ev([torch.ones(4, 3)])
    assert ev.resolved is None
    ev([torch.ones(4, 3)])
    assert ev.resolved == "vmap"


def test_auto_falls_back_for_an_in_place_update_of_an_unbatched_tensor():
    # vmap's error here names neither vmap nor a batching rule ("output with shape [3] doesn't match the broadcast
    # shape [4, 3]"); the member runs without vmap and vmap fails again: a vmap limitation.
    buffer = torch.zeros(3)

    def f(w):
        return buffer.add_(w).sum()

    ev = PopulationEvaluator(f, "auto")
    with pytest.warns(VmapFallbackWarning, match="broadcast shape"):
        ev([torch.ones(4, 3)])
    assert ev.resolved == "loop"
