"""Issue 25, item 4: the per-step path does no work that does not change the result.

Safety checks stay in effect (the eval-mode gradient leak test in test_trust.py still passes); what moved is
*when* they run: gradients left by an eval-mode backward are dropped on a flag set by the gradient hook instead
of a ``zero_grad`` of every module optimizer on every step; the synthesizer loss is computed when read; the
wrapper's Adam is torch's fused kernel (one kernel per module step instead of a dozen foreach calls).
"""

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode

from altgrad.dni import DNI, Conv1dDNI, _optim, interface, wrapper


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def randomise_synthesizers(dni: DNI) -> None:
    """Non-zero synthesizers: the zero-initialised last layers would hide a wrong target."""
    with torch.no_grad():
        for i, p in enumerate(dni.synthesizer_parameters()):  # each its own noise, also between equal shapes
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * i + p.numel())) * 0.1)


def make() -> DNI:
    return DNI(mlp(), hidden_size=4, grad_optim="adam", grad_lr=1e-2, lr=1e-2)


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def count_zero_grads(monkeypatch: pytest.MonkeyPatch, dni: DNI) -> list[int]:
    """Count the wrapper's clearing of a module optimizer's gradients (``zero_grad(set_to_none=True)``)."""
    calls = [0]
    original = wrapper.clear_grads

    def counted(opt: torch.optim.Optimizer) -> None:
        calls[0] += opt is not dni.grad_optimizer
        original(opt)

    monkeypatch.setattr(wrapper, "clear_grads", counted)  # the wrapper's own calls
    monkeypatch.setattr(_optim, "clear_grads", counted)  # update()'s: a step, then the clearing
    return calls


def test_a_training_step_does_not_zero_every_module_optimizer(monkeypatch):
    dni = make()
    x, y = data()
    F.cross_entropy(dni(x), y).backward()
    calls = count_zero_grads(monkeypatch, dni)
    for _ in range(3):
        F.cross_entropy(dni(x), y).backward()
    # The wrapper zeroes a module optimizer only after stepping it (one per wrapped module and step: 2 x 3);
    # the old code also zeroed all of them at every forward (2 more per step).
    assert calls[0] == 2 * 3


def test_eval_mode_gradients_are_still_dropped_at_the_next_training_step(monkeypatch):
    dni = make()
    x, y = data()
    F.cross_entropy(dni(x), y).backward()
    dni.eval()
    F.cross_entropy(dni(x), y).backward()  # leaves .grad on the wrapped layers (plain autograd)
    assert dni.network[0].weight.grad is not None
    dni.train()
    calls = count_zero_grads(monkeypatch, dni)
    dni(x)  # the forward drops them before the layers are stepped from their synthetic gradients
    assert calls[0] == 2 + 2  # the flag fired: both module optimizers dropped them, then each stepped once
    assert dni.network[0].weight.grad is None
    dni(x)
    assert calls[0] == 2 + 2 + 2  # the flag is cleared: only the steps' own zero_grad calls


def test_the_wrapper_adam_is_fused_and_matches_torch_adam():
    dni = make()
    for opt in (*dni.optimizers.values(), dni.grad_optimizer):
        assert opt is not None
        assert opt.defaults["fused"] is True
    w = dni.network[0].weight
    reference = w.detach().clone().requires_grad_(True)
    ref_opt = torch.optim.Adam([reference], lr=1e-2, foreach=False)
    grad = torch.randn_like(w)
    w.grad, reference.grad = grad.clone(), grad.clone()
    dni.optimizers["0"].step()
    ref_opt.step()
    # Same update rule, other kernel: the update (about lr = 1e-2 per entry) differs by float32 rounding, a few
    # ulp of the weights (|w| < 1, ulp < 1.2e-7): bound 1e-6.
    torch.testing.assert_close(w.detach(), reference.detach(), rtol=0, atol=1e-6)


def test_last_loss_is_the_regression_loss_of_the_last_target():
    dni = make()
    dni.interface("0").diagnostics = True
    x, y = data()
    F.cross_entropy(dni(x), y).backward()
    iface = dni.interface("0")
    pred, target = iface.last_prediction, iface.last_target
    assert pred is not None
    assert target is not None
    expected = ((pred.double() - target.double()) ** 2).sum() / 16
    loss = iface.last_loss
    assert loss is not None
    assert loss.dtype == torch.float32
    # float32 sum of 16 x 8 squares vs float64: relative error <= 128 ulp(1) ~ 1.5e-5
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-12)


def test_deferred_synthesizer_backward_gives_the_immediate_one():
    """With ``grad_optim`` the wrapper collects the synthesizers' loss gradients and back-propagates them in one
    pass before its synthesizer step; with ``grad_optim=None`` each is back-propagated as its target arrives (the
    user steps). Same gradients, so the same training: 3 steps with SGD on both sides."""
    x, y = data()
    runs = []
    for grad_optim in ("sgd", None):
        dni = make_with(grad_optim)
        user = None if grad_optim else torch.optim.SGD(dni.synthesizer_parameters(), lr=1e-2)
        for step in range(3):
            F.cross_entropy(dni(x[step:]), y[step:]).backward()
            if user is not None:
                user.step()
                user.zero_grad(set_to_none=True)
        dni.step_synthesizers()
        runs.append([p.detach().clone() for p in dni.parameters()])
    # The same float32 ops; one backward pass with three roots accumulates each synthesizer's gradient from its
    # own root only, so the sums are the same: equal up to a reordering of float32 accumulation (none here).
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def make_with(grad_optim: str | None) -> DNI:
    dni = DNI(mlp(), hidden_size=4, grad_optim=grad_optim, grad_lr=1e-2, lr=1e-2, optim="sgd")
    randomise_synthesizers(dni)
    return dni


def test_a_copy_between_backward_and_the_next_forward_changes_nothing_and_trains_on_its_own():
    """The wrapper holds graph-connected (prediction, gradient) pairs between the backward pass and its next
    synthesizer step; ``copy.deepcopy`` cannot copy those, so copying back-propagates them first: the original
    trains exactly as if it had not been copied, and the copy trains as the original does (the synthesizers'
    pending update travels with it: nn.Parameter's deepcopy drops .grad, which lost it before)."""
    x, y = data()
    runs = []
    for copy_it in (True, False):
        dni = make_with("adam")
        F.cross_entropy(dni(x), y).backward()
        if copy_it:
            twin = copy.deepcopy(dni)
            F.cross_entropy(twin(x), y).backward()
            twin.step_synthesizers()
            runs.append([p.detach().clone() for p in twin.parameters()])
        F.cross_entropy(dni(x), y).backward()
        dni.step_synthesizers()
        runs.append([p.detach().clone() for p in dni.parameters()])
    for twin, original, alone in zip(*runs, strict=True):
        assert torch.equal(original, alone)  # exact: the same ops from the same state
        assert torch.equal(twin, alone)  # exact: the same ops from a copied state


def _fast_config_case(case: str) -> tuple[nn.Module, dict, torch.Tensor, torch.Tensor]:
    """A network, the wrapper's arguments and a batch for the fast-configuration test."""
    g = torch.Generator().manual_seed(1)
    if case == "conv1d":  # a Conv1d chain with its convolutional synthesizers (features on dim 1)
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(4 * 6, 3),
        )  # fmt: skip
        kwargs = {"modules": ["0", "2"], "dni_network": Conv1dDNI, "dni_params": {"num_layers": 0}}
        return net, kwargs, torch.randn(16, 2, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    x, y = data()
    return mlp(), ({"context_size": 3} if case == "cdni" else {}), x, y


@pytest.mark.parametrize("case", ["mlp", "cdni", "conv1d"])
@pytest.mark.parametrize("inject", ["immediate", "deferred"])
def test_one_optimizer_after_backward_trains_as_the_per_module_steps(inject, case):
    """The documented fast configuration for small models: ``update_modules=False`` and one optimizer over the whole
    network, stepped after ``backward()``, with the synthetic gradients injected at forward time or in the loss's
    backward pass (``inject="deferred"``: one backward call instead of one per interface). No parameter is read
    again after its module's interface in the same step, so stepping at the end instead of during the forward gives
    the wrapper's default updates (immediate injection, one step per module), with one optimizer step instead of
    one per module: on an MLP, with label context (cDNI), and on a Conv1d chain with convolutional synthesizers;
    the network's and the synthesizers' parameters both. Both run torch's fused Adam, elementwise, on the same
    gradients: the parameters agree to a unit of float32 rounding of the O(1) weights (atol 1e-6) after 5 steps."""
    runs = []
    for update_modules in (True, False):
        net, kwargs, x, y = _fast_config_case(case)
        fast = {} if update_modules else {"inject": inject}
        dni = DNI(
            net, hidden_size=4, grad_lr=1e-2, lr=1e-2, update_modules=update_modules, sample_input=x[:2], **kwargs,
            **fast,
        )  # fmt: skip
        randomise_synthesizers(dni)  # the same non-zero synthesizers on both sides
        synths_start = [p.detach().clone() for p in dni.synthesizer_parameters()]
        head = list(net.children())[-1]
        trained = head.parameters() if update_modules else net.parameters()
        opt = torch.optim.Adam(trained, lr=1e-2, fused=True)
        for step in range(5):
            opt.zero_grad(set_to_none=True)
            context = {"context": y[step:]} if case == "cdni" else {}
            F.cross_entropy(dni(x[step:], **context), y[step:]).backward()
            opt.step()
        dni.step_synthesizers()
        runs.append((net, list(dni.synthesizer_parameters()), dni, synths_start))
    (net_a, synths_a, dni_a, synths_start), (net_b, synths_b, _, _) = runs
    # not vacuous: every wrapped module and every synthesizer parameter moved, one synthesizer per wrapped module
    start = _fast_config_case(case)[0]
    wrapped = list(dni_a.wrapped_modules())
    assert len(dni_a.interfaces) == len(wrapped) == 2
    for name in wrapped:
        for p, q in zip(
            net_a.get_submodule(name).parameters(), start.get_submodule(name).parameters(), strict=True
        ):
            assert (p - q).abs().max() > 1e-3
    for p, q in zip(synths_a, synths_start, strict=True):
        assert (p - q).abs().max() > 1e-4
    for p, q in zip([*net_a.parameters(), *synths_a], [*net_b.parameters(), *synths_b], strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_synthesizer_gradients_are_complete_when_backward_returns():
    """The wrapper back-propagates its synthesizers' losses together, but by the end of the backward pass that
    brought their targets: a user who clips or logs ``dni.parameters()`` after ``backward()`` sees the
    synthesizers' gradients, the same as with ``grad_optim=None`` (which back-propagates each at once)."""
    x, y = data()
    grads = []
    for grad_optim in ("sgd", None):
        dni = make_with(grad_optim)
        F.cross_entropy(dni(x), y).backward()
        grads.append([p.grad for p in dni.synthesizer_parameters()])
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads, strict=True):
        # the same float32 ops on the same values; one backward pass over all three predictions sums each
        # synthesizer's gradient from its own prediction only: equal up to a reordering of float32 sums.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_synthesizer_gradients_are_complete_after_a_backward_pass_that_brings_no_target():
    """Targets that arrive during the forward (the synthetic gradients back-propagated at once) are back-propagated
    into their synthesizers when the forward returns, so ``.grad`` is complete even when the loss's backward pass
    reaches no interface (``backward(inputs=...)``, ``torch.autograd.grad``), and nothing is held."""
    x, y = data()
    grads = []
    for grad_optim in ("sgd", None):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(6, 8),
            nn.Tanh(),
            nn.Linear(8, 8),
            nn.Tanh(),
            nn.Linear(8, 8),
            nn.Tanh(),
            nn.Linear(8, 3),
        )
        dni = DNI(net, hidden_size=4, update_modules=False, grad_optim=grad_optim)
        with torch.no_grad():
            for i, p in enumerate(dni.synthesizer_parameters()):
                p.add_(0.05 * (i % 5 + 1))
        F.cross_entropy(dni(x), y).backward(inputs=list(net[6].parameters()))
        grads.append([p.grad for p in dni.synthesizer_parameters()])
        if grad_optim:
            assert len(dni._deferred) == 0
    # the two lower synthesizers got their (bootstrapped) targets in the forward; the top one none
    assert [g is None for g in grads[0]] == [g is None for g in grads[1]] == [False] * 12 + [True] * 6
    for a, b in zip(grads[0][:12], grads[1][:12], strict=True):
        torch.testing.assert_close(
            a, b, rtol=1e-6, atol=1e-7
        )  # the same float32 ops, summed in another order


class Lazy(nn.Module):
    """A block whose activation size the wrapper cannot infer: its synthesizer is built at the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def lazy_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), Lazy(), nn.Linear(8, 3))


def test_synthesizers_share_one_parameter_group_with_the_same_updates():
    """One group: one update call per step for all synthesizers (a group each cost a call each). The updates are
    those of a group per synthesizer: Adam is elementwise, so the grouping changes no element's arithmetic (the
    tolerance only allows a kernel that vectorises a tensor's tail differently)."""
    x, y = data()
    one = DNI(lazy_net(), hidden_size=4, grad_lr=1e-2, lr=1e-2, modules=["0", "1"])
    split = DNI(lazy_net(), hidden_size=4, grad_lr=1e-2, lr=1e-2, modules=["0", "1"])
    for dni in (one, split):
        torch.manual_seed(2)  # Lazy's synthesizer's initial weights
        F.cross_entropy(dni(x), y).backward()  # builds Lazy's synthesizer, which joins the group
        randomise_synthesizers(dni)
    opt = one.grad_optimizer
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == list(one.synthesizer_parameters())
    old = split.grad_optimizer
    per_synth = [list(iface.synthesizer.parameters()) for iface in split.interfaces.values()]
    split._synth_optimizer = type(old)([{"params": ps} for ps in per_synth], **old.defaults)
    split._synth_optimizer.load_state_dict(
        old.state_dict()
        | {
            "param_groups": [
                {
                    **old.param_groups[0],
                    "params": list(range(sum(map(len, per_synth[:i])), sum(map(len, per_synth[: i + 1])))),
                }
                for i in range(len(per_synth))
            ]
        }
    )
    before = [p.detach().clone() for p in one.synthesizer_parameters()]
    for _ in range(3):
        for dni in (one, split):
            F.cross_entropy(dni(x), y).backward()
            dni.step_synthesizers()
    for a, b, a0 in zip(one.synthesizer_parameters(), split.synthesizer_parameters(), before, strict=True):
        assert not torch.equal(a, a0)  # exact: any change at all (every synthesizer tensor was trained)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_a_parameter_the_fused_group_cannot_take_gets_its_own_group():
    from altgrad.dni._optim import join_group

    a = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([a], fused=True)
    join_group(opt, [nn.Parameter(torch.zeros(2))])
    assert len(opt.param_groups) == 1
    assert len(opt.param_groups[0]["params"]) == 2
    meta = nn.Parameter(torch.zeros(2, device="meta"))  # no fused kernel on this device
    opt.param_groups[0]["lr"] = 0.125  # as a learning-rate scheduler sets it
    join_group(opt, [meta])
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["fused"] is None
    assert opt.param_groups[1]["lr"] == 0.125  # exact: the option copied, not the constructor's
    with pytest.raises(ValueError, match="already in the optimizer"):
        join_group(opt, [a])


@pytest.mark.parametrize("record", ["groups", "none"])
def test_a_copy_pickled_with_a_group_per_synthesizer_still_checkpoints(record):
    """Copies pickled by earlier versions hold one param group per synthesizer, with their names in
    ``_synth_groups`` or (before that) no record of them at all."""
    x, y = data()
    dni = DNI(lazy_net(), hidden_size=4, grad_lr=1e-2, lr=1e-2, modules=["0", "1"])
    for _ in range(2):
        F.cross_entropy(dni(x), y).backward()
    dni.step_synthesizers()
    want = dni.state_dict()["_extra_state"]["grad_optimizer"]
    old = dni.grad_optimizer
    per_synth = [list(iface.synthesizer.parameters()) for iface in dni.interfaces.values()]
    legacy = type(old)([{"params": ps} for ps in per_synth], **old.defaults)
    for p in (p for ps in per_synth for p in ps):
        legacy.state[p] = old.state[p]
    dni._synth_optimizer = legacy
    names = dni.__dict__.pop("_synth_owners")
    if record == "groups":
        dni.__dict__["_synth_groups"] = names
    copied = copy.deepcopy(dni)
    assert "_synth_groups" not in copied.__dict__
    got = copied.state_dict()["_extra_state"]["grad_optimizer"]
    assert list(got) == list(want) == ["interfaces.0", "interfaces.1"]
    for name in want:
        for s_got, s_want in zip(got[name]["state"], want[name]["state"], strict=True):
            for key in s_want:
                assert torch.equal(s_got[key], s_want[key]), (name, key)  # exact: the same tensors, copied


class _Boom(torch.autograd.Function):
    """Identity whose backward raises: a backward pass that fails part-way."""

    @staticmethod
    def forward(ctx, a):
        return a.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom")


def test_synthesizer_gradients_are_complete_after_an_earlier_backward_pass_failed():
    """A backward pass that raises after a target arrived drops the end-of-pass flush the target queued. The next
    backward pass still ends with the synthesizers' ``.grad`` complete and nothing held (the earlier code kept a
    "queued" flag that stayed set, so targets waited for the next forward). Two forwards, then their backward
    passes, the first failing: the second's gradients equal those of ``grad_optim=None``, which back-propagates
    each target at once (the failed pass's target included, as it arrived before the failure)."""
    x, y = data()
    grads = []
    for grad_optim in ("sgd", None):
        dni = make_with(grad_optim)
        side = torch.ones(1, requires_grad=True)
        boom = _Boom.apply(side)  # created first: the engine runs it after the network's nodes
        first = F.cross_entropy(dni(x[:8]), y[:8]) + boom.sum()
        second = F.cross_entropy(dni(x[8:]), y[8:])
        with pytest.raises(RuntimeError, match="boom"):
            first.backward()
        second.backward()
        grads.append([p.grad for p in dni.synthesizer_parameters()])
        if grad_optim:
            assert len(dni._deferred) == 0
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(
            a, b, rtol=1e-6, atol=1e-7
        )  # the same float32 ops, summed in another order


class _EagerSGD(torch.optim.SGD):
    """An optimizer that sets up per-parameter state in ``add_param_group`` (and so needs it called)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            self._init(group)

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "state"):  # not yet during __init__
            self._init(self.param_groups[-1])

    def _init(self, group) -> None:
        for p in group["params"]:
            self.state[p]["ema"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["ema"].mul_(0.9).add_(p.grad)
                    p.add_(self.state[p]["ema"], alpha=-group["lr"])


def test_a_synthesizer_built_later_joins_an_optimizer_class_through_its_add_param_group():
    """A grad_optim class with its own ``add_param_group`` gets the later synthesizer through it (review: joining
    the group directly skipped its set-up, a KeyError at the first step)."""
    x, y = data()
    dni = DNI(lazy_net(), hidden_size=4, grad_optim=_EagerSGD, grad_lr=1e-2, lr=1e-2, modules=["0", "1"])
    for _ in range(2):
        F.cross_entropy(dni(x), y).backward()
    dni.step_synthesizers()
    assert len(dni.grad_optimizer.param_groups) == 2
    assert all("ema" in dni.grad_optimizer.state[p] for p in dni.synthesizer_parameters())


def test_checkpoint_synthesizer_options_and_empty_states_load_as_saved():
    """A checkpoint keeps one entry per synthesizer. Loading one whose synthesizers had different options (an
    earlier version kept a group each) into the one group warns and names them; a synthesizer saved with no
    optimizer state yet leaves none behind in a wrapper that had trained (not its stale moments)."""
    x, y = data()
    fresh = DNI(lazy_net(), hidden_size=4, grad_lr=1e-2, lr=1e-2, modules=["0", "1"])
    torch.manual_seed(2)
    fresh(x)  # builds the lazy synthesizer; no target yet, so no optimizer state
    state = fresh.state_dict()
    trained = DNI(lazy_net(), hidden_size=4, grad_lr=1e-2, lr=1e-2, modules=["0", "1"])
    for _ in range(2):
        F.cross_entropy(trained(x), y).backward()
    trained.step_synthesizers()
    assert len(trained.grad_optimizer.state) > 0
    trained.load_state_dict(state)
    # the top synthesizer had no target yet (no state saved); the lower one got a bootstrapped one in the forward
    top = list(trained.interfaces["1"].synthesizer.parameters())
    assert all(not trained.grad_optimizer.state.get(p) for p in top)
    for a, b in zip(trained.synthesizer_parameters(), fresh.synthesizer_parameters(), strict=True):
        want, got = fresh.grad_optimizer.state.get(b, {}), trained.grad_optimizer.state.get(a, {})
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key])  # exact: the saved tensors, loaded
    old = copy.deepcopy(state)
    old["_extra_state"]["grad_optimizer"]["interfaces.1"]["options"]["lr"] = 0.5
    with pytest.warns(
        UserWarning, match="synthesizers 'interfaces.0' and 'interfaces.1' have different optimizer"
    ):
        trained.load_state_dict(old)
    assert trained.grad_optimizer.param_groups[0]["lr"] == 1e-2  # exact: the saved value itself


def test_loading_a_checkpoint_drops_the_update_the_wrapper_had_pending():
    """A wrapper that trained and then loads a checkpoint continues exactly as the run that saved it (review):
    the synthesizers' update its own last backward left pending belongs to the replaced state (the next forward
    applied it to the loaded synthesizers), and the loaded optimizer states are its own (torch's
    Optimizer.load_state_dict keeps the tensors, so the two wrappers shared their Adam moments and each step moved
    both)."""
    x, y = data()
    saver = make_with("adam")
    for _ in range(2):
        F.cross_entropy(saver(x), y).backward()
    state = saver.state_dict()  # applies the saver's pending update first
    loader = make_with("adam")
    for _ in range(3):
        F.cross_entropy(loader(x[1:]), y[1:]).backward()  # other data: a pending update of its own
    loader.load_state_dict(state)
    for dni in (saver, loader):
        F.cross_entropy(dni(x), y).backward()
        dni.step_synthesizers()
    for a, b in zip(loader.parameters(), saver.parameters(), strict=True):
        assert torch.equal(a, b)  # exact: the same ops from the same state


def test_a_group_the_user_adds_to_the_synthesizers_optimizer_changes_no_checkpoint_entry():
    """A synthesizer built later joins the optimizer's first group (the wrapper's), not a group the user added;
    the checkpoint finds each synthesizer's state by its parameters, not by their order."""
    x, y = data()
    dni = DNI(lazy_net(), hidden_size=4, grad_lr=1e-2, lr=1e-2, modules=["0", "1"])
    extra = nn.Parameter(torch.ones(3))
    dni.grad_optimizer.add_param_group({"params": [extra], "lr": 0.5})
    for _ in range(2):
        F.cross_entropy(dni(x), y).backward()
        extra.grad = torch.ones(3)
    saved = dni.state_dict()["_extra_state"]["grad_optimizer"]
    assert dni.grad_optimizer.param_groups[0]["params"] == list(dni.synthesizer_parameters())
    for key, iface in dni.interfaces.items():
        entry = saved[f"interfaces.{key}"]
        assert entry["options"]["lr"] == 1e-2  # exact: the wrapper's group's option
        for p, state in zip(iface.synthesizer.parameters(), entry["state"], strict=True):
            for name, value in dni.grad_optimizer.state[p].items():
                assert torch.equal(state[name], value)  # exact: the state itself


# ---------------------------------------------------------------- the direct Adam step (_optim.optimizer_step)
def _adam_pair(cls, options, dtype, shapes, seed):
    """Two identical optimizers over identical parameters (one stepped by ``optimizer_step``, one by ``step``);
    with more than one parameter, the later ones in a second group with other options."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    pair = []
    for ps in (params, [nn.Parameter(p.detach().clone()) for p in params]):
        groups = [{"params": ps[:1]}] + (
            [{"params": ps[1:], "lr": 0.02, "weight_decay": 0.3}] if ps[1:] else []
        )
        pair.append(cls(groups, fused=True, **options))
    return pair[0], pair[1], g


def _params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


ADAMS = {
    "Adam": (torch.optim.Adam, {}),
    "AdamW": (torch.optim.AdamW, {}),
    "Adam(decoupled_weight_decay=True)": (torch.optim.Adam, {"decoupled_weight_decay": True}),
}


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(ADAMS)),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.1]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    shapes=st.lists(st.sampled_from([(3,), (4, 5), (2, 3, 2), ()]), min_size=1, max_size=4),
    absent=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_the_direct_adam_step_is_the_optimizers_own_step(
    kind, amsgrad, maximize, weight_decay, dtype, shapes, absent, seed
):
    """``optimizer_step`` gives what ``optimizer.step()`` gives, state included, over 3 steps.

    Adam, AdamW and Adam with decoupled weight decay; options, dtypes, two parameter groups, parameters without a
    gradient (skipped, their state untouched), options changed between steps (a scheduler). Exact: the same fused
    kernel runs on the same tensors with the same arguments.
    """
    cls, extra = ADAMS[kind]
    options = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": weight_decay}
    options.update(amsgrad=amsgrad, maximize=maximize, **extra)
    direct, plain, g = _adam_pair(cls, options, dtype, shapes, seed)
    for step in range(3):
        for i, (p, q) in enumerate(zip(_params(direct), _params(plain))):
            grad = None if step and absent[i % 4] else torch.randn(p.shape, generator=g).to(dtype)
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        if step and any(p.grad is not None for p in _params(direct)):
            # the direct kernel call, not a fallback (the first step creates the state through step())
            assert _optim._fused_adam_calls(direct) is not None
        _optim.optimizer_step(direct)
        plain.step()
        for group in (*direct.param_groups, *plain.param_groups):
            group["lr"] *= 0.5
            group["betas"] = (group["betas"][0] - 0.1, group["betas"][1] - 0.01)
            group["eps"] *= 10
            group["weight_decay"] += 0.05
    for p, q in zip(_params(direct), _params(plain)):
        assert torch.equal(p, q)  # exact: same kernel, same inputs
        for key, value in plain.state[q].items():
            assert torch.equal(direct.state[p][key], value), key  # exact: same kernel, same inputs


def _stepped(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()  # creates the state
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    return opt


class _MyAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize(
    "make_opt",
    [
        pytest.param(lambda ps: torch.optim.Adam(ps, foreach=True), id="not fused"),
        pytest.param(lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.01), fused=True), id="tensor lr"),
        pytest.param(lambda ps: _MyAdam(ps, fused=True), id="subclass"),
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True), id="other class"),
    ],
)
def test_the_direct_adam_step_leaves_everything_else_to_step(make_opt):
    opt = _stepped(make_opt([nn.Parameter(torch.randn(4, 3))]))
    assert _optim._fused_adam_calls(opt) is None


def _fused_adam(*shapes, dtype=torch.float32):
    return _stepped(torch.optim.Adam([nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes], fused=True))


def test_the_direct_adam_step_leaves_tensors_step_would_group_or_refuse_to_step():
    """``step()`` groups tensors by device and dtype, or refuses them, before anything moves; so does the fallback
    (a direct call would hand the kernel lists it does not take)."""
    opt = _fused_adam((4, 3), (2,))
    assert _optim._fused_adam_calls(opt) is not None
    second = opt.param_groups[0]["params"][1]
    opt.param_groups[0]["params"][1] = nn.Parameter(second.detach().double())  # mixed dtypes in a group
    state = opt.state[opt.param_groups[0]["params"][1]] = opt.state.pop(second)
    opt.param_groups[0]["params"][1].grad = torch.ones(2, dtype=torch.float64)
    # its state is still float32: the parameter and the gradient differ
    assert _optim._fused_adam_calls(opt) is None
    opt = _fused_adam((4, 3))
    p = opt.param_groups[0]["params"][0]
    state = opt.state[p]
    for key, where in [("exp_avg", "meta"), ("step", "meta"), ("exp_avg_sq", torch.float64)]:
        # state left on another device (a module moved after training, say) or of another dtype
        saved, state[key] = state[key], state[key].to(where)
        assert _optim._fused_adam_calls(opt) is None, key
        state[key] = saved
    assert _optim._fused_adam_calls(opt) is not None
    opt.grad_scale = torch.ones(())  # set by a GradScaler around its step
    assert _optim._fused_adam_calls(opt) is None


def test_the_direct_adam_step_leaves_a_replaced_class_step_and_the_profiler_to_step(monkeypatch):
    opt = _fused_adam((4, 3))
    assert _optim._fused_adam_calls(opt) is not None
    with torch.profiler.profile() as prof:
        _optim.update(opt)
    names = {event.name for event in prof.events()}
    assert "Optimizer.step#Adam.step" in names
    assert "Optimizer.zero_grad#Adam.zero_grad" in names
    calls = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(
        torch.optim.Adam, "step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    _optim.optimizer_step(opt)
    assert calls == [1]


def test_clear_grads_calls_a_zero_grad_set_on_the_instance():
    opt = _fused_adam((4, 3))
    calls = []
    opt.zero_grad = lambda set_to_none=True: calls.append(set_to_none)
    _optim.update(opt)
    assert calls == [True]


def test_the_direct_adam_step_leaves_a_step_count_that_is_not_a_tensor_to_step():
    """A checkpoint from before torch 1.12 keeps ``step`` as a number: ``step()`` reports it, as without this path."""
    opt = _stepped(torch.optim.Adam([nn.Parameter(torch.randn(4, 3))], fused=True))
    opt.state[opt.param_groups[0]["params"][0]]["step"] = 1
    assert _optim._fused_adam_calls(opt) is None
    with pytest.raises(RuntimeError, match="singleton tensors"):
        _optim.optimizer_step(opt)


def test_the_direct_adam_step_runs_hooks_and_schedulers_through_step():
    """Step hooks run and an LR scheduler sees its optimizer stepped: both go through ``optimizer.step()``."""
    opt = _stepped(torch.optim.Adam([nn.Parameter(torch.randn(4, 3))], fused=True))
    assert _optim._fused_adam_calls(opt) is not None
    seen = []
    handle = opt.register_step_post_hook(lambda *_: seen.append("post"))
    _optim.optimizer_step(opt)
    assert seen == ["post"]
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda *_: seen.append("global"))
    try:
        _optim.optimizer_step(opt)
    finally:
        handle.remove()
    assert seen == ["post", "global"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert _optim._fused_adam_calls(opt) is None  # the scheduler wrapped step to see it called
    _optim.optimizer_step(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" if it did not see it
        scheduler.step()


def test_the_direct_adam_step_creates_no_state_itself():
    """Lazy state (the first step, a parameter added later) is created by ``optimizer.step()``, as without it."""
    p = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([p], fused=True)
    p.grad = torch.ones_like(p)
    assert _optim._fused_adam_calls(opt) is None
    _optim.optimizer_step(opt)
    assert float(opt.state[p]["step"]) == 1.0  # exact: a counter
    q = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [q]})
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    assert _optim._fused_adam_calls(opt) is None  # q has no state yet: the whole step goes through step()
    _optim.optimizer_step(opt)
    assert float(opt.state[p]["step"]) == 2.0  # exact: a counter
    assert float(opt.state[q]["step"]) == 1.0  # exact: a counter


# ---------------------------------------------------------------- the direct engine call (interface.run_backward)
def _graph(seed: int) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(5, 4, generator=g))
    x = torch.randn(3, 5, generator=g)
    return w, torch.tanh(x @ w), torch.randn(3, 4, generator=g)


def test_run_backward_is_torch_autograd_backward():
    """Same gradients as ``torch.autograd.backward`` (exact: the same engine runs the same graph), and the same
    refusals: a tensor that does not require grad, a gradient of another shape (a broadcastable one included, which
    the engine alone would sum), a real gradient for a complex tensor."""
    w, h, g = _graph(0)
    interface.run_backward((h,), (g,))
    v, k, _ = _graph(0)
    torch.autograd.backward(k, g)
    assert torch.equal(w.grad, v.grad)  # exact: the same engine on the same graph
    with pytest.raises(RuntimeError, match="does not require grad"):
        interface.run_backward((torch.ones(3),), (torch.ones(3),))
    _, h, _ = _graph(1)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        interface.run_backward((h,), (torch.ones(3, 5),))
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        interface.run_backward((h[:1],), (torch.ones(3, 4),))
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match="same dtype"):
        interface.run_backward((z,), (torch.ones(3),))


def test_run_backward_leaves_transforms_and_the_debug_log_to_torch_autograd_backward(monkeypatch):
    """Inside ``torch.func.grad`` the message is torch's; with the autograd graph's debug log on, the log sees
    the pass."""
    w, h, g = _graph(0)
    with pytest.raises(RuntimeError, match="inside a functorch transform"):
        torch.func.grad(lambda x: interface.run_backward((x * 2,), (torch.ones(3),)) or x.sum())(
            torch.ones(3)
        )
    calls = []
    original = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    interface.run_backward((h,), (g,))
    assert calls == []
    w, h, g = _graph(0)
    log = logging.getLogger("torch.autograd.graph")
    level = log.level
    log.setLevel(logging.DEBUG)
    try:
        interface.run_backward((h,), (g,))
    finally:
        log.setLevel(level)
    assert calls == [1]
    assert w.grad is not None


def test_run_backward_leaves_modes_and_subclasses_to_torch_autograd_backward():
    """An active ``__torch_function__`` mode, or a tensor subclass, sees the call, as without the direct path."""
    seen = []

    class Recording(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    w, h, g = _graph(0)
    with Recording():
        interface.run_backward((h,), (g,))
    assert torch.autograd.backward in seen
    assert w.grad is not None

    class Tagged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls += func is torch.autograd.backward
            return super().__torch_function__(func, types, args, kwargs or {})

    w, h, g = _graph(0)
    interface.run_backward((h.as_subclass(Tagged),), (g,))
    assert Tagged.calls == 1


def test_a_training_step_takes_the_direct_paths(monkeypatch):
    """Once the optimizers' state exists, every optimizer step the wrapper makes runs the fused kernel directly,
    and the only ``torch.autograd.backward`` call of a step is the user's ``loss.backward()``."""
    dni = DNI(mlp(), hidden_size=4, grad_optim="adam", grad_lr=1e-2, lr=1e-2, context_size=3)
    x, y = data()
    for _ in range(2):  # the first steps create the state through step()
        F.cross_entropy(dni(x, context=y), y).backward()
    direct, backwards = [], []
    calls = _optim._fused_adam_calls
    monkeypatch.setattr(
        _optim, "_fused_adam_calls", lambda opt: direct.append(calls(opt) is not None) or calls(opt)
    )
    original = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: backwards.append(1) or original(*a, **k))
    for _ in range(3):
        F.cross_entropy(dni(x, context=y), y).backward()
    assert len(direct) == 3 * 3  # two wrapped layers and the synthesizers' optimizer, per step
    assert all(direct)
    assert backwards == [1, 1, 1]
