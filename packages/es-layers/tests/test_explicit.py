"""Ask/tell: a population given from outside is evaluated exactly as asked (issue 22 §3)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import altgrad.es_layers as es
from altgrad.es_layers.explicit import deltas_from_vectors, perturbed_parameters, population

P = 6
# float64 throughout: both routes (x Wᵀ + x δᵀ batched, and x (θ + δ)ᵀ one member at a time) round each dot product
# of at most 100 O(1) terms to within 100 * 2**-53 * Σ|x||w| ≈ 1e-13 per layer, through 5 layers of Lipschitz-1
# activations; 1e-10 is a wide margin that any wrong member, sign or parameter (errors ≈ 0.1) still fails.
TOL = {"rtol": 1e-10, "atol": 1e-10}


class _Net(nn.Module):
    """Conv2d (grouped, reflect padding), affine, and Linear layers in several modes, one weight tied twice."""

    def __init__(self, n: int) -> None:
        super().__init__()
        kw = {"dtype": torch.float64, "seed": 0}
        self.conv = es.FlipoutConv2d(2, 4, 3, n, padding=1, padding_mode="reflect", groups=2, **kw)
        self.conv2 = es.PermutedConv2d(4, 2, 3, n, padding=1, **kw)
        self.affine = es.PerturbedAffine((2, 1, 1), n, **kw)
        self.lin = es.LowRankLinear(2 * 4 * 4, 5, n, rank=2, **kw)
        self.tied_a = es.PerturbedLinear(5, 5, n, **kw)
        self.tied_b = es.PerturbedLinear(5, 5, n, bias=False, **kw)
        self.tied_b.weight = self.tied_a.weight  # one parameter, two perturbed uses
        self.head = es.FlipoutLinear(5, 3, n, **kw)
        self.frozen = nn.LayerNorm(5, dtype=torch.float64)  # not perturbed

    def forward(self, x):
        h = self.affine(torch.tanh(self.conv2(torch.tanh(self.conv(x)))))
        h = torch.tanh(self.lin(h.flatten(1)))
        h = torch.tanh(self.tied_b(torch.tanh(self.tied_a(self.frozen(h)))))
        return self.head(h)


def _model(n: int = P) -> es.PerturbedModel:
    torch.manual_seed(0)
    pm = es.PerturbedModel(_Net(n), n, seed=1)
    pm.set_noise()
    return pm


def _member_reference(pm, values_k: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The plain model with its perturbed parameters set to member k's values."""
    plain = copy.deepcopy(pm.model)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, v in values_k.items():
            params[name].copy_(v)
        return plain(x)


def _assert_population(pm, deltas, member_values, repeats=2):
    """The population forward (``repeats`` rows per member) against the plain model, member by member."""
    n = pm.members.numel()
    x = torch.randn(repeats * n, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), population(pm, deltas):
        y = pm(x)
    for i, k in enumerate(pm.members.tolist()):
        # every repeat of member k (the layers are antithetic: +δ_k must be used in all of them)
        rows = [r * n + i for r in range(repeats)]
        torch.testing.assert_close(y[rows], _member_reference(pm, member_values(k), x[rows]), **TOL)


def test_vectors_are_evaluated_exactly_as_asked():
    pm = _model()
    params = perturbed_parameters(pm)
    assert list(params) == [
        "conv.weight", "conv.bias", "conv2.weight", "conv2.bias", "affine.weight", "affine.bias",
        "lin.weight", "lin.bias", "tied_a.weight", "tied_a.bias", "head.weight", "head.bias",
    ]  # fmt: skip
    center = parameters_to_vector(params.values())
    solutions = center + 0.3 * torch.randn(P, center.numel(), dtype=torch.float64)

    def member_values(k):
        probe = {name: torch.empty_like(p) for name, p in params.items()}
        vector_to_parameters(solutions[k], probe.values())
        return probe

    deltas = deltas_from_vectors(pm, solutions)
    _assert_population(pm, deltas, member_values)
    pm.set_members([4, 1, 3])  # a shard evaluates its members' rows of the same population
    _assert_population(pm, deltas, member_values)


def test_low_rank_factors_are_evaluated_as_a_times_b_transposed():
    pm = _model()
    params = perturbed_parameters(pm)
    gen = torch.Generator().manual_seed(3)
    deltas, dense = {}, {}
    for name, p in params.items():
        if p.dim() >= 2:
            r = 1 + len(name) % 3
            a = 0.3 * torch.randn(P, p.shape[0], r, generator=gen, dtype=torch.float64)
            b = torch.randn(P, p[0].numel(), r, generator=gen, dtype=torch.float64)
            deltas[name] = (a, b)
            dense[name] = (a @ b.transpose(1, 2)).view(P, *p.shape)
        else:
            deltas[name] = dense[name] = 0.3 * torch.randn(P, *p.shape, generator=gen, dtype=torch.float64)
    _assert_population(pm, deltas, lambda k: {name: params[name] + d[k] for name, d in dense.items()})


class _Policy(nn.Module):
    """Embedding, a transformer encoder layer (attention, LayerNorms), an LSTM and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        kw = {"dtype": torch.float64}
        self.embed = nn.Embedding(7, 8, **kw)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, **kw)
        self.rnn = nn.LSTM(8, 6, batch_first=True, **kw)
        self.head = nn.Linear(6, 2, **kw)

    def forward(self, tokens):
        h, _ = self.rnn(self.block(self.embed(tokens)))
        return self.head(h[:, -1])


@pytest.mark.parametrize("mode", ["lowrank", "iid", "flipout"])
@pytest.mark.parametrize("form", ["dense", "factors"])
def test_modules_perturbed_in_place_evaluate_the_asked_population(mode, form):
    torch.manual_seed(0)
    pm = es.perturb(_Policy(), P, mode=mode, seed=2)
    pm.set_noise()
    params = perturbed_parameters(pm)
    assert len(params) == len(list(pm.model.parameters()))  # every parameter is perturbed
    gen = torch.Generator().manual_seed(4)
    deltas, dense = {}, {}
    for name, p in params.items():
        if form == "factors" and p.dim() >= 2:
            a = 0.3 * torch.randn(P, p.shape[0], 2, generator=gen, dtype=torch.float64)
            b = torch.randn(P, p[0].numel(), 2, generator=gen, dtype=torch.float64)
            deltas[name] = (a, b)
            dense[name] = (a @ b.transpose(1, 2)).view(P, *p.shape)
        else:
            deltas[name] = dense[name] = 0.3 * torch.randn(P, *p.shape, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2 * P, 5), generator=gen)
    with torch.no_grad(), population(pm, deltas):
        y = pm(tokens)
    for k in range(P):
        rows = [k, P + k]  # both repeats use +δ_k
        values = {name: params[name] + d[k] for name, d in dense.items()}
        torch.testing.assert_close(y[rows], _member_reference(pm, values, tokens[rows]), **TOL)


def test_block_leaves_no_trace_even_after_an_exception():
    pm = _model()
    x = torch.randn(2 * P, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        before = pm(x)
    deltas = {name: torch.zeros(P, *p.shape, dtype=p.dtype) for name, p in perturbed_parameters(pm).items()}
    with pytest.raises(RuntimeError, match="inside"), population(pm, deltas):
        raise RuntimeError("inside the block")
    for layer in pm.perturbed_layers:
        assert "_population_forward" not in layer.__dict__
        assert "_current_noise" not in layer.__dict__
        assert layer.antithetic
    with torch.no_grad():
        after = pm(x)
    assert torch.equal(after, before)  # exact: same seeded route before and after the block
    # zero deltas evaluate θ itself: the unperturbed model, every member
    with torch.no_grad(), population(pm, deltas):
        y = pm(x)
    with torch.no_grad():
        torch.testing.assert_close(y, pm.model(x), **TOL)


def test_bad_deltas_are_refused_before_anything_changes():
    pm = _model()
    params = perturbed_parameters(pm)
    good = {name: torch.zeros(P, *p.shape, dtype=p.dtype) for name, p in params.items()}
    cases = [
        ({k: v for k, v in good.items() if k != "lin.bias"}, ValueError, "missing \\['lin.bias'\\]"),
        ({**good, "frozen.weight": torch.zeros(P, 5)}, ValueError, "not perturbed by any layer"),
        ({**good, "nope": torch.zeros(P, 5)}, ValueError, "not parameters of the model"),
        ({**good, "lin.bias": torch.zeros(P + 1, 5)}, ValueError, "one delta per member"),
        ({**good, "lin.bias": (torch.zeros(P, 5, 1), torch.zeros(P, 1, 1))}, ValueError, "weight matrix"),
        ({**good, "lin.weight": (torch.zeros(P, 5, 2), torch.zeros(P, 32, 1))}, ValueError, "factors"),
        ({**good, "lin.bias": torch.zeros(P, 5, dtype=torch.int64)}, TypeError, "floating-point"),
        ({**good, "lin.bias": [1.0] * 5}, TypeError, "a tensor"),
    ]
    for deltas, error, match in cases:
        with pytest.raises(error, match=match), population(pm, deltas):
            pass
        assert all("_current_noise" not in layer.__dict__ for layer in pm.perturbed_layers)
    with pytest.raises(ValueError, match="solutions must have shape"):
        deltas_from_vectors(pm, torch.zeros(P, 3))


def test_evotorch_pgpe_population_is_evaluated_as_asked():
    functional = pytest.importorskip("evotorch.algorithms.functional")
    pm = _model()
    params = perturbed_parameters(pm)
    center = parameters_to_vector(params.values()).detach()
    state = functional.pgpe(
        center_init=center,
        center_learning_rate=0.05,
        stdev_learning_rate=0.1,
        objective_sense="min",
        stdev_init=0.2,
    )
    values = functional.pgpe_ask(state, popsize=P)
    assert values.shape == (P, center.numel())

    def member_values(k):
        probe = {name: torch.empty_like(p) for name, p in params.items()}
        vector_to_parameters(values[k].to(torch.float64), probe.values())
        return probe

    _assert_population(pm, deltas_from_vectors(pm, values), member_values, repeats=1)
    x = torch.randn(P, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad(), population(pm, deltas_from_vectors(pm, values)):
        fitness = pm(x).pow(2).sum(1)
    state = functional.pgpe_tell(state, values, fitness)
    assert not torch.equal(state.optimizer_state.center, center)  # exact: any change shows the tell moved it
