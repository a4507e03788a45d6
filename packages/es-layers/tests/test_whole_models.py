"""Whole real models (issue 22 §1): every trainable parameter perturbed or refused, each batched path against the
per-member float64 loop (every population row runs the plain module with its member's ``W ± E_k``).

Tolerance: float64 (unit roundoff u = 2^-53 ≈ 1.1e-16). Each output is a chain of at most ~10^3 rounded operations
on O(1) values through at most a few layers with Lipschitz constants of order 10 (softmax, tanh, sigmoid, layer
norm of O(1) inputs), so |batched - reference| <= 10^3 · 10^2 · u ≈ 1e-11; we allow 1e-9 (atol and rtol).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import altgrad.es_layers as es

DT = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-9}  # see the module docstring
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MODES = ["iid", "lowrank", "flipout", "permuted"]


# ----------------------------------------------------------------------------- the slow obvious reference
def member_parameters(pm, k: int, sign: float) -> dict[str, torch.Tensor]:
    """``{name: W + sign E_k}`` with one name per (module object, attribute) holding a perturbed parameter: a module
    registered twice appears once, a parameter tied between modules at each (``run_member`` does not tie)."""
    noise = {}
    for unit in pm.perturbed_layers:
        e, eps = unit.dense_noise()
        for p, z in ((unit.weight, e), (unit.bias, eps)):
            if p is not None:
                noise.setdefault(id(p), p.detach() + sign * z[k])  # all uses of a tied parameter share E_k
    return {
        f"{prefix}.{name}" if prefix else name: noise[id(t)]
        for prefix, module in pm.model.named_modules()
        for name, t in module._parameters.items()
        if t is not None and id(t) in noise
    }


def population_reference(pm, rows: int, call, antithetic: bool = True):
    """Outputs of ``call(params, i)`` for every population row ``i`` (``call`` slices row ``i``'s inputs and runs
    ``functional_call``); returns the list of per-row outputs."""
    n = pm.members.numel()
    reps = rows // n
    outs = []
    for i in range(rows):
        k, r = i % n, i // n
        sign = -1.0 if antithetic and reps > 1 and r >= reps // 2 else 1.0
        outs.append(call(member_parameters(pm, k, sign), i))
    return outs


def run_member(model, params, *args, **kwargs):
    """The plain forward (perturbed flags off) with ``params`` substituted."""
    with torch.no_grad():
        return functional_call(model, params, args, kwargs, tie_weights=False)


def _check_population(pm, inputs, pop_dim, sigma=0.3, antithetic=True, out_dim=None):
    """The population forward of ``pm`` against the per-row reference; returns the output.

    ``pop_dim``: the inputs' population dimension; ``out_dim``: the output's (default ``pop_dim``).
    """
    out_dim = pop_dim if out_dim is None else out_dim
    pm.set_noise(sigma)
    with torch.no_grad():
        y = pm(*inputs)
    y0 = y[0] if isinstance(y, tuple) else y
    rows = y0.shape[out_dim]

    def call(params, i):
        sliced = [t.narrow(pop_dim if t.dim() > 1 else 0, i, 1) for t in inputs]
        out = run_member(pm.model, params, *sliced)
        return out[0] if isinstance(out, tuple) else out

    ref = torch.cat(population_reference(pm, rows, call, antithetic), dim=out_dim)
    torch.testing.assert_close(y0, ref, **TOL)
    return y


def _options(draw_mode, rank):
    return {"rank": rank} if draw_mode == "lowrank" else {}


# ----------------------------------------------------------------------------- per kind, hypothesis
@SETTINGS
@given(data=st.data())
def test_attention_matches_member_loop(data):
    draw = data.draw
    mode = draw(st.sampled_from(MODES))
    heads = draw(st.sampled_from([1, 2]))
    e = heads * draw(st.integers(1, 3))
    batch_first = draw(st.booleans())
    bias = draw(st.booleans())
    n = draw(st.integers(1, 3))
    antithetic = draw(st.booleans())
    reps = draw(st.sampled_from([1, 2] if antithetic else [1, 3]))
    lq, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    which = draw(st.sampled_from(["self", "kv", "cross"]))
    need_weights = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(e, heads, bias=bias, batch_first=batch_first, dtype=DT)

        def forward(self, q, k, v):
            if which == "self":
                k = v = q
            elif which == "kv":
                v = k
            return self.mha(q, k, v, need_weights=need_weights)[0]

    b = reps * n
    shape_q = (b, lq, e) if batch_first else (lq, b, e)
    shape_k = (b, s, e) if batch_first else (s, b, e)
    if which == "self":
        shape_k = shape_q
    q = torch.randn(shape_q, generator=g, dtype=DT)
    k = torch.randn(shape_k, generator=g, dtype=DT)
    v = torch.randn(shape_k, generator=g, dtype=DT)
    opts = _options(mode, draw(st.integers(1, 2)))
    pm = es.perturb(Net(), n, mode=mode, seed=7, antithetic=antithetic, strict=True, **opts)
    assert {p.path for p in pm.es_plan()} == {"attention"}
    _check_population(pm, (q, k, v), 0 if batch_first else 1, antithetic=antithetic)


@SETTINGS
@given(data=st.data())
def test_recurrent_matches_member_loop(data):
    draw = data.draw
    mode = draw(st.sampled_from(MODES))
    cell = draw(st.sampled_from([nn.LSTM, nn.GRU]))
    batch_first = draw(st.booleans())
    bias = draw(st.booleans())
    layers = draw(st.integers(1, 2))
    bidirectional = draw(st.booleans())
    n = draw(st.integers(1, 3))
    antithetic = draw(st.booleans())
    reps = draw(st.sampled_from([1, 2] if antithetic else [1, 3]))
    t, d_in, h = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    with_state = draw(st.booleans())
    # an LSTM may project h to proj_size < hidden_size (weight_hr, perturbed too)
    proj = {"proj_size": draw(st.integers(0, h - 1))} if cell is nn.LSTM and h > 1 else {}
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    rnn = cell(
        d_in, h, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=DT, **proj
    )
    model = rnn  # the root itself is perturbed in place
    b = reps * n
    x = torch.randn((b, t, d_in) if batch_first else (t, b, d_in), generator=g, dtype=DT)
    opts = _options(mode, draw(st.integers(1, 2)))
    pm = es.perturb(model, n, mode=mode, seed=8, antithetic=antithetic, strict=True, **opts)
    assert {p.path for p in pm.es_plan()} == {cell.__name__.lower()}
    pop_dim = 0 if batch_first else 1
    if not with_state:
        _check_population(pm, (x,), pop_dim, antithetic=antithetic)
        return
    h0 = torch.randn(
        layers * (2 if bidirectional else 1), b, proj.get("proj_size") or h, generator=g, dtype=DT
    )
    c0 = torch.randn(layers * (2 if bidirectional else 1), b, h, generator=g, dtype=DT)
    state = (h0, c0) if cell is nn.LSTM else h0
    pm.set_noise(0.3)
    with torch.no_grad():
        out, final = pm(x, state)
    n_rows = b

    def call(params, i):
        xi = x.narrow(pop_dim, i, 1)
        si = tuple(s.narrow(1, i, 1) for s in state) if cell is nn.LSTM else state.narrow(1, i, 1)
        return run_member(pm.model, params, xi, si)

    refs = population_reference(pm, n_rows, call, antithetic)
    torch.testing.assert_close(out, torch.cat([r[0] for r in refs], dim=pop_dim), **TOL)
    if cell is nn.LSTM:
        for j in range(2):
            torch.testing.assert_close(final[j], torch.cat([r[1][j] for r in refs], dim=1), **TOL)
    else:
        torch.testing.assert_close(final, torch.cat([r[1] for r in refs], dim=1), **TOL)


@SETTINGS
@given(data=st.data())
def test_embedding_conv1d_layer_norm_match_member_loop(data):
    draw = data.draw
    mode = draw(st.sampled_from(MODES))
    n = draw(st.integers(1, 3))
    antithetic = draw(st.booleans())
    reps = draw(st.sampled_from([1, 2] if antithetic else [1, 3]))
    vocab, dim, chans, length = draw(st.integers(2, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), 4
    bias = draw(st.booleans())
    kernel = draw(st.sampled_from([1, 3]))
    padding_mode = draw(st.sampled_from(["zeros", "circular"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim, dtype=DT)
            self.conv = nn.Conv1d(
                dim, chans, kernel, padding=kernel // 2, bias=bias, padding_mode=padding_mode
            )
            self.conv.to(DT)
            self.norm = nn.LayerNorm(chans, bias=bias, dtype=DT)

        def forward(self, idx):
            h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
            return self.norm(h)

    idx = torch.randint(0, vocab, (reps * n, length), generator=g)
    opts = _options(mode, draw(st.integers(1, 2)))
    pm = es.perturb(Encoder(), n, mode=mode, seed=9, antithetic=antithetic, strict=True, **opts)
    paths = {p.name: p.path for p in pm.es_plan()}
    assert paths["emb.weight"] == "embedding"
    assert paths["conv.weight"] == "conv1d"
    assert paths["norm.weight"] == "layer_norm"
    _check_population(pm, (idx,), 0, antithetic=antithetic)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_matches_member_loop(mode, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, dtype=DT)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model.eval()  # the fused fast path must not bypass the population
    x = torch.randn(3, 4, 8, dtype=DT) if batch_first else torch.randn(4, 3, 8, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=DT)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = model

        def forward(self, x):
            return self.enc(x, mask=mask, is_causal=True)

    pm = es.perturb(Net(), 3, mode=mode, seed=10, strict=True)
    plan = pm.es_plan()
    assert not plan.not_perturbed
    assert {p.population_dim for p in plan} == {0 if batch_first else 1}
    _check_population(pm, (x,), 0 if batch_first else 1)


# ----------------------------------------------------------------------------- generic fallback, plan, strict
class _Scale(nn.Module):
    """A module with a parameter of its own: no batched path."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))
        self.w = nn.Parameter(torch.randn(d, d, dtype=DT) / 3)

    def forward(self, x):
        return torch.tanh(x @ self.w.T) * self.g


class _Counter(_Scale):
    """A forward vmap cannot batch (an in-place update of a Python counter through .item())."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + int(x.abs().sum().item() >= 0)
        return super().forward(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("cls", "path"), [(_Scale, "generic (vmap)"), (_Counter, "generic (loop)")])
def test_generic_fallback_matches_member_loop(mode, cls, path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, dtype=DT), cls(5), nn.GRUCell(5, 3, dtype=DT))
    pm = es.perturb(model, 3, mode=mode, seed=11)
    plan = {p.name: p for p in pm.es_plan()}
    assert plan["1.g"].path == "generic"  # before any population forward
    assert plan["2.weight_hh"].path == "generic"
    x = torch.randn(6, 4, dtype=DT)
    _check_population(pm, (x,), 0)
    plan = {p.name: p for p in pm.es_plan()}
    assert plan["1.g"].path == path
    assert plan["1.w"].noise == ("iid" if mode == "iid" else mode)
    assert plan["1.g"].noise == "iid"
    assert plan["0.weight"].path == "linear"
    with pytest.raises(ValueError, match=r"strict=True.*'1' \(_"):
        es.perturb(nn.Sequential(nn.Linear(4, 5), cls(5)), 3, strict=True)


class _Attend(nn.Module):
    """``nn.MultiheadAttention`` called as a transformer layer calls it: the output is ``(y, None)``."""

    def __init__(self, **options):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=DT, **options)

    def forward(self, q, kv):
        return self.attn(q, kv, kv, need_weights=False)


class _PairCounter(_Counter):
    """A loop-path forward whose output has a ``None`` leaf."""

    def forward(self, x):
        return super().forward(x), None


@pytest.mark.parametrize(
    ("make", "inputs", "path"),
    [
        (lambda: _Attend(add_bias_kv=True), ((4, 3, 8), (4, 5, 8)), "generic (vmap)"),
        (lambda: _Attend(kdim=6, vdim=6), ((4, 3, 8), (4, 5, 6)), "generic (vmap)"),
        (lambda: _PairCounter(5), ((4, 5),), "generic (loop)"),
    ],
)
def test_generic_output_with_a_none_leaf(make, inputs, path):
    # an attention without a batched path returns (y, None): both generic paths raised on the None (vmap and
    # torch.stack take tensors only)
    torch.manual_seed(0)
    pm = es.perturb(make(), 2, mode="lowrank", seed=11)
    y = _check_population(pm, tuple(torch.randn(*shape, dtype=DT) for shape in inputs), 0)
    assert y[1] is None
    assert {p.path for p in pm.es_plan()} == {path}


def test_strict_failure_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 5), _Scale(5))
    with pytest.raises(ValueError, match="strict=True"):
        es.perturb(model, 3, strict=True)
    assert type(model[0]) is nn.Linear
    assert type(model[1]) is _Scale


def test_plan_lists_frozen_and_excluded_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    pm = es.perturb(model, 2, include=lambda name, m: name != "2")
    paths = {p.name: p.path for p in pm.es_plan()}
    assert paths == {
        "0.weight": "linear",
        "0.bias": "linear",
        "1.weight": "frozen",
        "1.bias": "frozen",
        "2.weight": "not perturbed",
        "2.bias": "not perturbed",
    }
    assert [p.name for p in pm.es_plan().not_perturbed] == ["2.weight", "2.bias"]
    text = str(pm.es_plan())
    assert text.splitlines()[0].split() == ["parameter", "shape", "path", "noise", "pop.", "dim", "also"]
    assert "not perturbed" in text


def test_state_dict_and_parameters_are_unchanged_by_perturb():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.LSTM(4, 5, batch_first=True))
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    es.perturb(model, 2, mode="lowrank")
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert isinstance(model[1], nn.LSTM)  # a subclass: isinstance checks of user code still hold


# ----------------------------------------------------------------------------- every parameter gets an ES gradient
class _LSTMPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, dtype=DT)  # sequence-first (torch's default)
        self.head = nn.Linear(6, 2, dtype=DT)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[-1])  # (B, 6): the population is on dim 0 again


class _ConvEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4, dtype=DT)
        self.conv = nn.Conv1d(4, 6, 3, padding=1, dtype=DT)
        self.norm = nn.LayerNorm(6, dtype=DT)
        self.head = nn.Linear(6, 1, dtype=DT)

    def forward(self, idx):
        h = self.norm(self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2))
        return self.head(h.mean(1))


class _GPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 8, dtype=DT)
        self.block = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, batch_first=True, norm_first=True, dtype=DT
        )
        self.ln_f = nn.LayerNorm(8, dtype=DT)
        self.lm_head = nn.Linear(8, 11, bias=False, dtype=DT)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx):
        return self.lm_head(self.ln_f(self.block(self.wte(idx), is_causal=False)))


MODELS = {
    "transformer layer": (
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, dtype=DT),
        lambda n: torch.randn(5, 2 * n, 8, dtype=DT),
        (1, 1),
        12,
    ),
    "lstm policy": (_LSTMPolicy, lambda n: torch.randn(5, 2 * n, 4, dtype=DT), (1, 0), 6),
    "conv1d encoder": (_ConvEncoder, lambda n: torch.randint(0, 9, (2 * n, 7)), (0, 0), 7),
    "gpt block, tied embedding": (_GPTBlock, lambda n: torch.randint(0, 11, (2 * n, 5)), (0, 0), 15),
}


@pytest.mark.parametrize("mode", ["iid", "lowrank", "flipout"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_gets_an_es_gradient(name, mode):
    # issue 22 measured 8 of 12, 4 of 6 and 5 of 7 parameters without an ES gradient on the old code
    build, inputs, (pop_dim, out_dim), count = MODELS[name]
    torch.manual_seed(0)
    model = build()
    n = 3
    pm = es.perturb(model, n, mode=mode, seed=12, strict=True)
    assert len(list(model.parameters())) == count
    assert not pm.es_plan().not_perturbed
    x = inputs(n)
    y = _check_population(pm, (x,), pop_dim, out_dim=out_dim)
    fitness = y.detach().double().pow(2).movedim(out_dim, 0).reshape(2, n, -1).sum((0, 2))
    pm.set_grad(fitness)
    missing = [p for p, q in model.named_parameters() if q.grad is None]
    assert missing == []
    # the update of each parameter is Σ_k w_k E_k of its noise
    names = {id(q): p for p, q in model.named_parameters()}
    for unit in pm.perturbed_layers:
        e, eps = unit.dense_noise()
        for q, noise in ((unit.weight, e), (unit.bias, eps)):
            if q is not None:
                want = torch.einsum("k,k...->...", fitness, noise)
                torch.testing.assert_close(q.grad, want, **TOL, msg=names[id(q)])


# ----------------------------------------------------------------------------- population dim, refusals
def test_sequence_first_population_dim_is_the_batch_dim():
    # an LSTM (T, B, in) followed by a Linear on (T, B, H): population_dim=1 puts the population on B for both
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, dtype=DT)
            self.head = nn.Linear(4, 2, dtype=DT)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    x = torch.randn(5, 4, 3, dtype=DT)  # T = 5, B = 2 repeats x 2 members
    pm = es.perturb(Net(), 2, mode="lowrank", seed=13, population_dim=1)
    assert {p.population_dim for p in pm.es_plan()} == {1}
    _check_population(pm, (x,), 1)
    pm0 = es.perturb(Net(), 2, mode="lowrank", seed=13)  # population on dim 0 of the head's (T, B, H): T = 5
    pm0.set_noise()
    with pytest.raises(ValueError, match=r"batch size \(5\) must be a multiple"):
        pm0(x)


@pytest.mark.parametrize("hidden", [4, 5])
def test_sequence_first_last_state_keeps_the_population_on_dim_0(hidden):
    # population_dim=1, then the last state (B, H) through a LayerNorm and a Linear: like the
    # Linear, the LayerNorm reads a 2-D input's population on dim 0 (it read dim 1 = H: wrong values when H = B = 4,
    # an error otherwise)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, hidden, dtype=DT)
            self.norm = nn.LayerNorm(hidden, dtype=DT)
            self.head = nn.Linear(hidden, 2, dtype=DT)
            self.emb = nn.Embedding(6, 3, dtype=DT)

        def forward(self, idx):
            out, _ = self.lstm(self.emb(idx))  # idx (T, B): embedded on (T, B, 3)
            return self.head(self.norm(out[-1]))

    idx = torch.randint(0, 6, (5, 4))  # T = 5, B = 2 repeats x 2 members
    pm = es.perturb(Net(), 2, mode="lowrank", seed=13, population_dim=1)
    _check_population(pm, (idx,), 1, out_dim=0)


def test_population_refuses_unbatched_and_packed_inputs():
    pm = es.perturb(nn.Sequential(nn.LSTM(3, 4)), 2, seed=0)
    pm.set_noise()
    with pytest.raises(ValueError, match="batched 3-D input"):
        pm(torch.randn(5, 3))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="PackedSequence"):
        pm(packed)
    mha = nn.Sequential()
    mha.add_module("a", nn.MultiheadAttention(4, 2))
    pm = es.perturb(mha, 2, seed=0)
    pm.set_noise()
    with pm.perturbed(), pytest.raises(ValueError, match="batched 3-D"):
        pm.model.a(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4))


def test_unperturbed_forward_is_the_original_module():
    torch.manual_seed(0)
    model = _GPTBlock()
    idx = torch.randint(0, 11, (4, 5))
    with torch.no_grad():
        before = model(idx)
    es.perturb(model, 2, mode="lowrank", seed=0)
    with torch.no_grad():
        after = model(idx)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # exact: the original forwards run unchanged


def test_tied_weights_with_different_noise_are_refused():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    model[1] = es.LowRankLinear(3, 5, 2, bias=False, rank=2)
    model[1].weight = emb.weight
    with pytest.raises(ValueError, match="different noise"):
        es.perturb(model, 2, mode="lowrank", rank=1)


def test_refused_tie_changes_nothing():
    # the tie check runs once the model is converted (PerturbedModel); its refusal must undo the conversion (the
    # Embedding kept its PerturbedEmbedding class, the Linear its replacement, the encoder its nested-tensor flag)
    emb = nn.Embedding(5, 3)
    tail = nn.Linear(5, 4)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, batch_first=True), 1)
    model = nn.Sequential(emb, es.LowRankLinear(3, 5, 2, bias=False, rank=2), tail, encoder)
    model[1].weight = emb.weight
    assert encoder.use_nested_tensor
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="different noise"):
        es.perturb(model, 2, mode="lowrank", rank=1)
    assert type(model[0]) is nn.Embedding
    assert "_es_units" not in model[0].__dict__
    assert model[2] is tail
    assert type(tail) is nn.Linear
    assert type(encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert encoder.use_nested_tensor
    assert list(model.state_dict()) == keys
    es.perturb(model, 2, mode="lowrank", rank=2)  # the refused call left no trace: a valid call converts it
    assert type(model[0]).__name__ == "PerturbedEmbedding"


def test_generic_module_output_shape_errors_are_clear():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.p

    pm = es.perturb(nn.Sequential(Bad()), 2, seed=0)
    pm.set_noise()
    with pytest.raises(ValueError, match=r"batch size \(3\) must be a multiple"):
        pm(torch.randn(3, 3))


def test_generic_module_returning_a_state_off_the_population_dim_is_refused():
    # a custom cell returning (y, state) with the state as (layers, B, H): the population is on dim 1 of the
    # state, not population_dim=0; the generic path used to merge it as if it were and return a scrambled state
    class Cell(_Scale):
        def forward(self, x):
            y = super().forward(x)
            return y, torch.stack([y, x])

    pm = es.perturb(nn.Sequential(Cell(3)), 2, seed=0, antithetic=False)
    pm.set_noise()
    with torch.no_grad(), pytest.raises(ValueError, match=r"tensor 1 of shape \(2, 3, 3\) per member"):
        pm(
            torch.randn(6, 3, dtype=DT)
        )  # 3 repeats of 2 members: each member's (3, 3) rows; the state (2, 3, 3)


def test_dtype_move_regenerates_the_noise_of_modules_perturbed_in_place():
    # the units' stored noise is dropped by .to()/.double() and regenerated from the seed in the new dtype
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.LSTM(3, 4, batch_first=True))
    pm = es.perturb(model, 2, mode="lowrank", seed=0)
    pm.set_noise(0.1)
    idx = torch.tensor([[0, 1, 2], [3, 4, 0]])
    with torch.no_grad():
        y32 = pm(idx)[0]
        assert pm.noise_memory_bytes > 0
        model.double()
        y64 = pm(idx)[0]
    assert y64.dtype == torch.float64
    # float32 vs float64 of the same values: a few float32 roundings (u = 6e-8) through 3 steps of O(1) gates
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lowrank", "flipout"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_decoder_layer_cross_attention_matches_member_loop(mode, batch_first):
    # self-attention (query is key is value) and cross-attention on the memory (key is value): both projections
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, dtype=DT)
    tgt, memory = torch.randn(4, 6, 8, dtype=DT), torch.randn(4, 5, 8, dtype=DT)  # batch-first (B=4, T, E)
    if not batch_first:
        tgt, memory = tgt.transpose(0, 1).contiguous(), memory.transpose(0, 1).contiguous()
    pm = es.perturb(layer, 2, mode=mode, seed=14, strict=True)
    assert not pm.es_plan().not_perturbed
    _check_population(pm, (tgt, memory), 0 if batch_first else 1)


@pytest.mark.parametrize("mode", ["lowrank", "iid"])
def test_block_registered_under_two_names_is_one_perturbation(mode):
    # the same LayerNorm and the same GRU object at two places: one unit each, every use sees the member's W + E_k
    torch.manual_seed(0)
    norm = nn.LayerNorm(4, dtype=DT)
    gru = nn.GRU(4, 4, batch_first=True, dtype=DT)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = norm, norm
            self.first, self.second = gru, gru

        def forward(self, x):
            return self.b(self.second(self.a(self.first(x)[0]))[0])

    net = Net()
    pm = es.perturb(net, 2, mode=mode, seed=15, strict=True)
    assert len(pm.perturbed_layers) == 3  # LayerNorm (weight + bias), GRU input and recurrent weights
    plan = {p.name: p for p in pm.es_plan()}
    assert plan["a.weight"].also == ("b.weight",)
    assert plan["first.weight_hh_l0"].also == ("second.weight_hh_l0",)
    _check_population(pm, (torch.randn(4, 3, 4, dtype=DT),), 0)


def test_generic_path_with_a_submodule_registered_twice_keeps_its_parameters():
    # functional_call with tie_weights=True swaps a module registered at two names twice and restores a plain
    # tensor; the generic path swaps each (module, attribute) once
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.5, dtype=DT))
            lin = nn.Linear(3, 3, dtype=DT)
            self.first, self.again = lin, lin

        def forward(self, x):
            return self.again(torch.tanh(self.first(x))) * self.scale

    model = nn.Sequential(Block())
    params = [(n, p) for n, p in model.named_parameters()]
    pm = es.perturb(model, 2, mode="lowrank", seed=16)
    for _ in range(2):
        _check_population(pm, (torch.randn(4, 3, dtype=DT),), 0)
    assert [(n, p) for n, p in model.named_parameters()] == params
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_generic_module_on_a_sequence_first_population():
    # population_dim=1: the generic path splits the members along dim 1 of (T, B, features)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 5, dtype=DT)
            self.scale = _Scale(5)

        def forward(self, x):
            return self.scale(self.lstm(x)[0])

    pm = es.perturb(Net(), 2, mode="flipout", seed=17, population_dim=1)
    assert {p.population_dim for p in pm.es_plan()} == {1}
    _check_population(pm, (torch.randn(6, 4, 3, dtype=DT),), 1)
    assert {p.path for p in pm.es_plan()} == {"lstm", "generic (vmap)"}


@pytest.mark.parametrize("mode", ["lowrank", "iid"])
def test_whole_sequence_first_transformer_matches_member_loop(mode):
    # nn.Transformer (seq-first): the stacks' final LayerNorms also see (T, B, E); eval mode with a padding mask
    # (the nested-tensor and fused fast paths would bypass the population)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, dtype=DT)

        def forward(self, src, tgt):
            pad = torch.zeros(src.shape[1], src.shape[0], dtype=torch.bool)
            pad[:, -1] = True
            return self.t(src, tgt, src_key_padding_mask=pad, memory_key_padding_mask=pad)

    net = Net().eval()
    pm = es.perturb(net, 2, mode=mode, seed=18, strict=True)
    plan = pm.es_plan()
    assert {p.population_dim for p in plan} == {1}
    assert not plan.not_perturbed
    _check_population(pm, (torch.randn(5, 4, 8, dtype=DT), torch.randn(3, 4, 8, dtype=DT)), 1)


def test_generic_module_around_an_already_perturbed_layer_is_refused():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(3))
            self.inner = es.LowRankLinear(3, 3, 2)

        def forward(self, x):
            return self.inner(x) * self.g

    model = nn.Sequential(Wrap())
    with pytest.raises(ValueError, match=r"submodule 'inner' is already perturbed"):
        es.perturb(model, 2)
    assert type(model[0]) is Wrap  # nothing changed


# ----------------------------------------------------------------------------- Embedding padding_idx
def _padded_pair(mode, padding_idx, tied=False):
    """Twin models (same weights, seed and noise), one with ``padding_idx``, one without."""
    out = []
    for pad in (padding_idx, None):
        torch.manual_seed(0)
        emb = nn.Embedding(6, 4, padding_idx=pad, dtype=DT)
        head = nn.Linear(4, 6, bias=False, dtype=DT)
        if tied:
            head.weight = emb.weight  # LM weight tying: the head reads every row, the padding row too
        out.append(es.perturb(nn.Sequential(emb, head), 3, mode=mode, seed=5, antithetic=True, strict=True))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_embedding_padding_row_is_never_perturbed_and_gets_no_gradient(mode):
    # backprop gives an Embedding's padding_idx row no gradient; the ES population used to perturb it and
    # set_grad gave it Σ w_k E_k[p], pure noise that made the padding vector drift under any optimizer
    padded, plain = _padded_pair(mode, padding_idx=1)
    idx = torch.tensor([[1, 2, 1], [0, 1, 5], [3, 4, 1]]).repeat(2, 1)  # 2 antithetic repeats of 3 members
    for pm in (padded, plain):
        pm.set_noise(0.3)
    with torch.no_grad():
        rows, rows_plain = padded.model[0](idx), plain.model[0](idx)
    w = padded.model[0].weight.detach()
    # exact: torch.where copies the unperturbed row unchanged
    assert torch.equal(rows[idx == 1], w[1].expand(int((idx == 1).sum()), 4))
    assert not torch.equal(rows_plain[idx == 1], w[1].expand(int((idx == 1).sum()), 4))  # exact: differs
    torch.testing.assert_close(rows[idx != 1], rows_plain[idx != 1], **TOL)  # the other rows: unchanged
    # the whole population against the per-member loop (member parameters from dense_noise, padding row zero)
    with torch.no_grad():
        out = padded(idx)
    ref = population_reference(padded, 6, lambda params, i: run_member(padded.model, params, idx[i : i + 1]))
    torch.testing.assert_close(out, torch.cat(ref), **TOL)
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    padded.set_grad(weights)
    plain.set_grad(weights)
    g, g_plain = padded.model[0].weight.grad, plain.model[0].weight.grad
    assert not g[1].any()  # exact: the row is assigned zero
    assert g_plain[1].abs().sum() > 0
    torch.testing.assert_close(g[torch.arange(6) != 1], g_plain[torch.arange(6) != 1], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_tied_embedding_padding_row_keeps_the_heads_gradient(mode):
    # tied to a head that reads every row, the padding row's estimate is the head's part, as in backprop
    padded, plain = _padded_pair(mode, padding_idx=1, tied=True)
    for pm in (padded, plain):
        pm.set_noise(0.3)
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    padded.set_grad(weights)
    plain.set_grad(weights)
    g, g_plain = padded.model[0].weight.grad, plain.model[0].weight.grad
    assert g[1].abs().sum() > 0
    torch.testing.assert_close(g, g_plain, **TOL)


def test_explicit_population_reads_the_padding_row_with_its_delta():
    # population() evaluates exactly θ + δ_k, as the plain Embedding (whose forward reads the padding row) would
    from altgrad.es_layers.explicit import deltas_from_vectors, perturbed_parameters, population

    padded, _ = _padded_pair("lowrank", padding_idx=1)
    params = perturbed_parameters(padded)
    center = torch.nn.utils.parameters_to_vector(params.values())
    values = center + 0.3 * torch.randn(
        3, center.numel(), generator=torch.Generator().manual_seed(1), dtype=DT
    )
    idx = torch.tensor([[1, 2], [1, 0], [4, 1]])
    with torch.no_grad(), population(padded, deltas_from_vectors(padded, values)):
        out = padded(idx)
    for k in range(3):
        member = {name: torch.empty_like(p) for name, p in params.items()}
        torch.nn.utils.vector_to_parameters(values[k], member.values())
        torch.testing.assert_close(out[k], run_member(padded.model, member, idx[k : k + 1])[0], **TOL)
