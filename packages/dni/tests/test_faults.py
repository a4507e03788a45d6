"""Faults and restarts (issue 23): abandoned forwards, checkpoints that resume exactly, failed calls."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altgrad.dni import DNI, BackwardInterface, LinearDNI


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def synth_weights(dni: DNI) -> list[torch.Tensor]:
    return [p.detach().clone() for p in dni.synthesizer_parameters()]


class Boom(Exception):
    pass


def _train(dni: DNI, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        x, y = batch(step)
        F.cross_entropy(dni(x), y).backward()


# ---------------------------------------------------------------------------------------------------------------
# Issue 23 item 4: a forward abandoned while its traceback is kept must not stop the synthesizers for good.
# ---------------------------------------------------------------------------------------------------------------
def test_forward_that_raises_with_kept_traceback_does_not_freeze_the_synthesizers():
    net = mlp()
    dni = DNI(net, hidden_size=8, grad_lr=1e-2)

    def explode(module, args, output):
        raise Boom("failure inside the forward, after the first interface made its prediction")

    handle = net[2].register_forward_hook(explode, prepend=True)
    try:
        dni(batch(0)[0])
    except Boom as exc:
        kept = exc.__traceback__  # what sys.last_traceback does in a REPL: the frames keep the graph alive
    handle.remove()
    assert kept is not None
    assert dni.num_steps == 0  # the failed forward is not counted as a step
    before = synth_weights(dni)
    _train(dni, 10, start=1)
    dni.step_synthesizers()
    # exact: did a step happen at all
    moved = [not torch.equal(a, b) for a, b in zip(before, synth_weights(dni))]
    assert all(moved), moved  # before the fix: no synthesizer parameter moved in 10 steps
    assert dni.diagnostics()["0"]["abandoned"] == 1
    assert "abandoned" not in dni.diagnostics()["2"]  # its forward never reached the second interface
    assert dni.interface("0")._pending == 0
    del kept


def _forward_then_fail(dni: DNI, x: torch.Tensor):
    out = dni(x)  # noqa: F841  (kept alive by the traceback, as in a REPL)
    raise Boom("failure in the loss, after the forward returned")


def test_output_kept_by_a_traceback_is_abandoned_when_an_update_is_due():
    dni = DNI(mlp(), hidden_size=8, grad_lr=1e-2)
    try:
        _forward_then_fail(dni, batch(0)[0])
    except Boom as exc:
        kept = exc.__traceback__
    # The first interface's target arrived during that forward (bootstrapped from the second interface's synthetic
    # gradient); the second interface's prediction waits for a backward pass that never comes.
    assert (dni.interface("0")._pending, dni.interface("2")._pending) == (0, 1)
    _train(dni, 1, start=1)  # a later prediction of the second interface gets its target
    before = synth_weights(dni)
    with pytest.warns(RuntimeWarning, match="abandoned") as record:
        _train(dni, 1, start=2)  # so the stale one is given up and the update is applied
    # the user's line (in _train), not the wrapper's
    assert {w.filename for w in record if "abandoned" in str(w.message)} == {__file__}
    # exact: did a step happen at all (the first one moves only the zero-initialised final layers)
    moved = [not torch.equal(a, b) for a, b in zip(before, synth_weights(dni))]
    assert any(moved), moved
    assert {name: d.get("abandoned", 0) for name, d in dni.diagnostics().items()} == {"0": 0, "2": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(dni, 3, start=3)  # nothing pending any more: no further warning
    # A backward through the abandoned output still works; it trains no synthesizer and counts nothing new.
    out = kept.tb_next.tb_frame.f_locals["out"]
    grads_before = [p.grad for p in dni.synthesizer_parameters()]
    out.sum().backward()
    assert [p.grad for p in dni.synthesizer_parameters()] == grads_before
    assert dni.diagnostics()["2"]["abandoned"] == 1


def test_standalone_interface_with_its_own_optimizer_gets_past_an_abandoned_prediction():
    torch.manual_seed(0)
    block, head = nn.Linear(6, 8), nn.Linear(8, 3)
    synth = LinearDNI(input_size=8, hidden_size=8, output_size=8)
    iface = BackwardInterface(synth, optimizer=torch.optim.SGD(synth.parameters(), lr=0.1))
    kept = iface(block(batch(0)[0]))  # never back-propagated, still referenced (as by a kept traceback)
    weights = []
    for step in range(1, 4):
        x, y = batch(step)
        weights.append(synth.final.weight.detach().clone())
        if step == 2:  # step 1's target has arrived: the older prediction is given up when step 2 predicts
            with pytest.warns(RuntimeWarning, match="abandoned"):
                F.cross_entropy(head(iface(block(x))), y).backward()
        else:
            F.cross_entropy(head(iface(block(x))), y).backward()
    weights.append(synth.final.weight.detach().clone())
    assert iface.abandoned == 1
    assert iface._pending == 0
    # exact: did a step happen at all (before the fix the stale prediction blocked every step)
    assert not torch.equal(weights[-1], weights[1])
    del kept


def test_forwards_accumulated_into_one_backward_are_not_abandoned():
    dni = DNI(mlp(), hidden_size=8, grad_lr=1e-2)
    _train(dni, 1)
    (x1, y1), (x2, y2) = batch(1), batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = F.cross_entropy(dni(x1), y1) + F.cross_entropy(dni(x2), y2)
        loss.backward()
        dni.step_synthesizers()
    assert all("abandoned" not in d for d in dni.diagnostics().values())
    assert all(dni.interface(n)._pending == 0 for n in ("0", "2"))


# ---------------------------------------------------------------------------------------------------------------
# Issue 23 item 6: the checkpoint holds the optimizers and resumes bit-identically in a new process.
# ---------------------------------------------------------------------------------------------------------------
RUN = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F
    from altgrad.dni import DNI, BackwardInterface, LinearDNI


    class Block(nn.Module):  # its activation size is not inferable: the synthesizer is built at the first forward
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 12)
            self.norm = nn.LayerNorm(12)

        def forward(self, x):
            return torch.tanh(self.norm(self.lin(x)))


    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), Block(), nn.Linear(12, 3))
        dni = DNI(net, modules=["0", "2"], hidden_size=8, context_size=3, grad_lr=1e-2, lr=1e-2, warmup_steps=2)
        return dni, torch.optim.SGD(net[3].parameters(), lr=0.1)  # the unwrapped head: the user's optimizer


    def train(dni, head, start, steps):
        for step in range(start, start + steps):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
            loss = F.cross_entropy(dni(x, context=y), y)
            head.zero_grad()
            loss.backward()
            head.step()
        return dni.state_dict()
    """
)
K, N = 3, 4


def _flatten(value, prefix=""):
    """Every tensor and number of a (nested) state dict, by path."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: value}


def test_checkpoint_resumes_bit_identically_in_a_new_process(tmp_path):
    env: dict = {}
    exec(RUN, env)
    with torch.random.fork_rng():
        dni, head = env["build"]()
        env["train"](dni, head, 0, K)
        torch.save(dni.state_dict(), tmp_path / "ckpt.pt")
        uninterrupted = env["train"](dni, head, K, N)
    script = RUN + textwrap.dedent(
        f"""
        torch.set_num_threads(1)
        dni, head = build()
        torch.manual_seed(123)  # anything random from here on must not matter
        dni.load_state_dict(torch.load({str(tmp_path / "ckpt.pt")!r}, weights_only=True))
        torch.save(train(dni, head, {K}, {N}), {str(tmp_path / "resumed.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    want, got = _flatten(uninterrupted), _flatten(resumed)
    assert sorted(got) == sorted(want)
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    for key in tensors:
        assert torch.equal(got[key], want[key]), key  # exact: same route, state restored from the checkpoint
    assert {k: v for k, v in got.items() if k not in tensors} == {
        k: v for k, v in want.items() if k not in tensors
    }
    # Adam's step, exp_avg and exp_avg_sq of 2 + 4 module tensors (Linear; Block's Linear and LayerNorm) and
    # 6 + 6 synthesizer tensors are in it (the issue: 18 tensors diverged without them).
    assert sum("/optimizers/" in k or "/grad_optimizer/" in k for k in tensors) == 3 * (6 + 12)


def test_optimizers_are_public_and_named():
    env: dict = {}
    exec(RUN, env)
    with torch.random.fork_rng():
        dni, head = env["build"]()
        assert list(dni.optimizers) == ["0", "2"]
        params = [p for group in dni.optimizers["0"].param_groups for p in group["params"]]
        assert params == list(dni.network[0].parameters())
        # Block's synthesizer waits for the first forward, then joins the one parameter group (one update call)
        built = [p for iface in dni.interfaces.values() for p in iface.synthesizer.parameters()]
        assert dni.grad_optimizer.param_groups[0]["params"] == built
        env["train"](dni, head, 0, 1)
    assert len(dni.grad_optimizer.param_groups) == 1
    synth = {id(p) for p in dni.synthesizer_parameters()}
    assert {id(p) for group in dni.grad_optimizer.param_groups for p in group["params"]} == synth
    assert DNI(mlp(), grad_optim=None).grad_optimizer is None
    assert DNI(mlp(), update_modules=False).optimizers == {}


def test_old_checkpoint_without_optimizer_state_needs_strict_false():
    dni = DNI(mlp(), hidden_size=8)
    _train(dni, 2)
    state = dni.state_dict()
    extra = state["_extra_state"]
    state["_extra_state"] = {k: extra[k] for k in ("num_steps", "features", "trigger_features")} | {
        "version": 1
    }
    fresh = DNI(mlp(seed=5), hidden_size=8)
    w0 = fresh.network[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="strict=False"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.network[0].weight, w0)  # exact: a refused load changes nothing
    with pytest.warns(UserWarning, match="no optimizer state"):
        fresh.load_state_dict(state, strict=False)
    assert fresh.num_steps == 2
    assert torch.equal(fresh.network[0].weight, dni.network[0].weight)  # exact: copied from the checkpoint


def test_checkpoint_of_other_modules_is_refused_before_anything_changes():
    dni = DNI(mlp(), hidden_size=8)
    _train(dni, 1)
    other = DNI(mlp(seed=3), hidden_size=8, modules=["0"])
    w0 = other.network[0].weight.detach().clone()
    with pytest.raises(ValueError, match="module optimizers"):
        other.load_state_dict(dni.state_dict(), strict=False)
    assert torch.equal(other.network[0].weight, w0)  # exact: a refused load changes nothing


# ---------------------------------------------------------------------------------------------------------------
# Deliver rule: a failed call leaves no trace (no step consumed, no stale state).
# ---------------------------------------------------------------------------------------------------------------
def _snapshot(dni: DNI) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in _flatten(dni.state_dict()).items()}


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key  # exact: same route, nothing may have changed
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_forward_that_fails_before_any_interface_leaves_no_trace(error):
    def run(fail: bool) -> dict:
        dni = DNI(mlp(), hidden_size=8, grad_lr=1e-2, warmup_steps=3)
        _train(dni, 2)
        if fail:
            before = _snapshot(dni)

            def interrupt(module, args):
                raise error()

            handle = dni.network[0].register_forward_pre_hook(interrupt)
            with pytest.raises(error):
                dni(batch(99)[0])
            handle.remove()
            _same(before, _snapshot(dni))  # weights, optimizer states, step counter (warm-up) untouched
        _train(dni, 4, start=2)
        return _snapshot(dni)

    _same(run(fail=False), run(fail=True))  # and training continues exactly as without the failure
